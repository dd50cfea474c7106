"""The processes of a multi-process pretraining run must start from the same checkpoint.

On a multi-node run whose ``output_dir`` is a local disk, rank 0's checkpoints are not on the other
nodes: with ``--resume`` rank 0 resumed while they started over, out of step. Here rank 1 of a
two-rank gloo run stands in for such a node (it sees no checkpoint); the run must stop on every rank
with one message, before rank 0 changes anything in the run folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from mixgeneformer import checkpoints as ckpt
from mixgeneformer.pretrain import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
import test_distributed  # noqa: E402
from test_distributed import _torchrun  # noqa: E402
from test_pretrain import make_vocab, tiny_config, training_data  # noqa: E402

# Each rank: `--resume` when RESUME is set; the rank named by BLIND_RANK sees no checkpoint in output_dir,
# the one named by STALE_RANK sees STALE_CHECKPOINT (another run's checkpoint of the same name) there.
WORKER = r'''
import os, sys
import torch.distributed as dist
from mixgeneformer import checkpoints
from mixgeneformer.pretrain import load_pretrain_config, run_pretraining

if os.environ.get("BLIND_RANK") == os.environ["RANK"]:
    checkpoints.latest_complete_checkpoint = lambda run_dir: None  # a node whose disk lacks rank 0's checkpoints
if os.environ.get("STALE_RANK") == os.environ["RANK"]:  # a node whose disk holds an earlier run's checkpoint-3
    from pathlib import Path
    checkpoints.latest_complete_checkpoint = lambda run_dir: Path(os.environ["STALE_CHECKPOINT"])
run_pretraining(load_pretrain_config(sys.argv[1]), resume=bool(os.environ.get("RESUME")))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture
def worker(monkeypatch):
    monkeypatch.setattr(test_distributed, "WORKER", WORKER)


def test_ranks_that_see_different_checkpoints_stop_before_anything_is_written(tmp_path, worker):
    corpus = training_data(tmp_path / "corpus", make_vocab(), n_cells=64)
    out = tmp_path / "run"
    first = tiny_config(corpus, out, train={"max_steps": 3, "per_device_batch_size": 4},
                        checkpoint={"save_steps": 3}, distributed={"timeout_s": 60})
    proc, _, _ = _torchrun(tmp_path, first)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-3"]
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    # Both ranks see the checkpoint: the run resumes and finishes.
    longer = tiny_config(corpus, out, train={"max_steps": 5, "per_device_batch_size": 4},
                         checkpoint={"save_steps": 5}, distributed={"timeout_s": 60})
    (tmp_path / "ok").mkdir()
    shutil.copytree(out, tmp_path / "ok" / "run")
    proc, _, _ = _torchrun(tmp_path / "ok", {**longer, "output_dir": str(tmp_path / "ok" / "run")}, {"RESUME": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(tmp_path / "ok" / "run")] == [1, 2, 3, 4, 5]

    # Rank 1 sees none: one message naming both plans and the fix, on every rank; the folder untouched.
    proc, elapsed, _ = _torchrun(tmp_path, longer, {"RESUME": "1", "BLIND_RANK": "1"}, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 0 plans to resume from checkpoint-3, rank 1 to start at step 0" in log
    assert "filesystem that all nodes share" in log
    assert log.count("see different run folders") >= 2  # raised on both ranks, not a hang on one
    after = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before  # no metrics cut back, no config or environment rewritten, no new checkpoint
    assert [int(r["step"]) for r in read_metrics(out)] == [1, 2, 3]


def test_ranks_that_see_checkpoints_of_one_name_from_different_runs_stop(tmp_path, worker):
    """A node whose local output_dir holds an earlier run's checkpoint-3 (same settings, same cells, same
    number of processes, so every other resume check passes) would resume from other weights, optimizer
    state and data position than rank 0: names alone do not tell them apart."""
    corpus = training_data(tmp_path / "corpus", make_vocab(), n_cells=64)
    runs = {}
    for name, logging in (("run", 1), ("stale", 2)):  # two runs of the same training, logged differently
        runs[name] = tiny_config(corpus, tmp_path / name, train={"max_steps": 3, "per_device_batch_size": 4},
                                 checkpoint={"save_steps": 3}, distributed={"timeout_s": 60},
                                 logging={"logging_steps": logging})
        (tmp_path / f"{name}_launch").mkdir()
        proc, _, _ = _torchrun(tmp_path / f"{name}_launch", runs[name])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out, stale = tmp_path / "run", tmp_path / "stale" / "checkpoint-3"
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    longer = {**runs["run"], "train": {**runs["run"]["train"], "max_steps": 5}}
    proc, _, _ = _torchrun(tmp_path, longer, {"RESUME": "1", "STALE_RANK": "1", "STALE_CHECKPOINT": str(stale)}, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 0 plans to resume from checkpoint-3, rank 1 to resume from checkpoint-3 with other contents" in log
    assert log.count("see different run folders") >= 2  # raised on both ranks, not a hang on one
    after = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before
