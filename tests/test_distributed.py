"""Two CPU ranks (gloo) under torchrun: parameters in sync, only rank 0 writes, cross-rank
negatives, disjoint and complete shards, and a failing rank ends the whole job (RELIABILITY 17)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixgeneformer import checkpoints as ckpt
from mixgeneformer.pretrain import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_pretrain import make_vocab, tiny_config, training_data  # noqa: E402

# Runs inside each rank: trains, then dumps what the test checks (parameters, the batch shards).
WORKER = r'''
import json, os, sys
import numpy as np
import torch
import torch.distributed as dist
from mixgeneformer.pretrain import load_pretrain_config, run_pretraining
from mixgeneformer.sampling import PretrainSampler

config = load_pretrain_config(sys.argv[1])
result = run_pretraining(config)
rank, world = dist.get_rank(), dist.get_world_size()
report = {"rank": rank, "world": world, "step": result.global_step}
backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
report["timeout_s"] = backend.options._timeout.total_seconds()  # distributed.timeout_s, not the 30-min default

# The shards of one epoch, as Accelerate cuts the sampler's batches for this rank.
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler
n = int(os.environ["N_CELLS"])
sampler = PretrainSampler(n, batch_size=8 * world, seed=config.train.seed, lengths=np.arange(n) % 17 + 1)
sampler.set_epoch(0)
shard = BatchSamplerShard(BatchSampler(sampler, 8, drop_last=False), num_processes=world, process_index=rank)
report["shard"] = [i for batch in shard for i in batch]
with open(os.path.join(os.environ["REPORT_DIR"], f"rank{rank}.json"), "w") as handle:
    json.dump(report, handle)
dist.barrier()  # tear down together (a rank closing gloo pairs early can abort the other)
dist.destroy_process_group()
'''

N_CELLS = 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, config: dict, extra_env: dict | None = None, timeout: float = 240):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "worker.py").write_text(WORKER)
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    env = {**os.environ, "REPORT_DIR": str(reports), "N_CELLS": str(N_CELLS), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path / "run.yaml")]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start, reports


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("ddp-corpus"), make_vocab(), n_cells=N_CELLS)


def test_two_gloo_ranks_stay_in_sync_and_only_rank0_writes(tmp_path, corpus_root):
    out = tmp_path / "run"
    config = tiny_config(corpus_root, out, train={"max_steps": 6, "per_device_batch_size": 4},
                         objective={"gather_negatives": True},  # negatives from both ranks, with gradients
                         checkpoint={"save_steps": 3, "keep": 0}, distributed={"timeout_s": 60})
    proc, _, reports = _torchrun(tmp_path, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["step"] == r1["step"] == 6
    assert r0["timeout_s"] == r1["timeout_s"] == 60  # a hung rank ends the job after distributed.timeout_s
    # That every rank's trained weights equal the bundle: test_audit_pretrain_paths (the bundle file loaded on
    # each rank, compared here before, is one file and could not differ).

    # Only rank 0 wrote: one metrics file, one set of checkpoints, one RNG state per rank inside.
    assert sorted(p.name for _, p in ckpt.list_checkpoints(out)) == ["checkpoint-3", "checkpoint-6"]
    for _, path in ckpt.list_checkpoints(out):
        assert ckpt.checkpoint_problem(path) is None
        assert {p.name for p in path.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # not duplicated by rank 1
    assert all(r["contrastive_loss"] > 0 for r in rows)
    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 2
    assert [p.name for p in out.glob(".*")] == [".mixgf-output"]  # only the output marker: no staging / temporary leftovers

    # Shards of an epoch are disjoint, and together cover every cell.
    s0, s1 = set(r0["shard"]), set(r1["shard"])
    assert not s0 & s1
    assert s0 | s1 == set(range(N_CELLS))


def test_a_failing_rank_ends_every_rank_without_hanging(tmp_path, corpus_root):
    out = tmp_path / "run"
    config = tiny_config(corpus_root, out, train={"max_steps": 1000, "per_device_batch_size": 4},
                         checkpoint={"save_steps": 1000}, distributed={"timeout_s": 30})
    # Documented test hook: rank 1 raises at the end of optimizer step 2.
    proc, elapsed, reports = _torchrun(tmp_path, config, {"MIXGF_TEST_FAIL_AT_STEP": "1:2"}, timeout=180)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert elapsed < 150
    assert not list(reports.glob("*.json"))  # no rank finished as if nothing happened
    assert not (out / "model").exists()
