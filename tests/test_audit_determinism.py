"""Same seed, same command, same machine -> the same numbers (RELIABILITY 29, 9, 15, 17), for the paths
the other tests leave out: gene medians of real cells under workers and chunk sizes, pretraining with
DataLoader worker processes across an epoch boundary (with held-out evaluation), and the whole
medians -> vocabulary -> tokens path under two different Python hash seeds (set / dict order)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain import make_corpus, make_vocab, params_of, tiny_config, training_data

from mixgeneformer.medians import compute_medians
from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining

TIMING = ("tokens_per_s", "mfu", "time_s")


@pytest.fixture(scope="module")
def real_cells(baron_data, tmp_path_factory) -> list[Path]:
    """120 real Baron cells of each species (a seeded sample), as two .h5ad files."""
    import anndata as ad

    root = tmp_path_factory.mktemp("real")
    paths = []
    for species in ("human", "mouse"):
        adata = ad.read_h5ad(baron_data / f"baron_pancreas_{species}.h5ad")
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 120, replace=False))
        path = root / f"{species}.h5ad"
        adata[rows].copy().write_h5ad(path)
        paths.append(path)
    return paths


def test_medians_of_real_cells_do_not_depend_on_workers_or_chunk_size(real_cells):
    one = compute_medians(real_cells, workers=1)
    assert len(one.values) > 10_000
    for workers, chunk_size in ((2, 17), (1, 50), (2, 10_000)):
        assert compute_medians(real_cells, workers=workers, chunk_size=chunk_size) == one, (workers, chunk_size)


_HASH_SEED_SCRIPT = """
import hashlib, sys
import anndata as ad, numpy as np
from mixgeneformer.medians import compute_medians
from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata
from mixgeneformer.vocab import build_vocabulary
paths = sys.argv[1:]
medians = compute_medians(paths)
vocab = build_vocabulary("ortholog", medians=medians)
digest = hashlib.blake2b()
digest.update("\\n".join(vocab.tokens).encode())
digest.update(np.asarray([medians.values[g] for g in sorted(medians.values)], dtype=np.float64).tobytes())
for path in paths:
    corpus = tokenize_anndata(ad.read_h5ad(path), vocab, medians, TokenizeConfig(style="v2", max_len=256))
    for ids in corpus["input_ids"]:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
print(len(vocab), digest.hexdigest())
"""


def test_medians_vocabulary_and_tokens_do_not_depend_on_the_python_hash_seed(real_cells):
    """Sets and dicts of strings iterate in an order set by PYTHONHASHSEED, random per process:
    nothing they order may reach a number (ortholog vocabulary, medians, token ids)."""
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", _HASH_SEED_SCRIPT, *map(str, real_cells)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.strip().splitlines()[-1])
    assert int(outputs[0].split()[0]) > 10_000
    assert outputs[0] == outputs[1]


def test_pretraining_with_dataloader_workers_equals_loading_in_process_across_epochs(tmp_path):
    """data.workers > 0 collates (masks) in worker processes: the masking of every epoch, the held-out
    evaluation and so the weights and metrics must equal loading in the main process."""
    root = training_data(tmp_path / "data", make_vocab(), build=make_corpus, n_cells=48)
    runs = {}
    for workers in (0, 2):
        config = tiny_config(root, tmp_path / f"w{workers}", data={"workers": workers, "eval_fraction": 0.15},
                             train={"max_steps": 9}, checkpoint={"save_steps": 3, "keep": 1})
        result = run_pretraining(pretrain_config_from_dict(config))
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(tmp_path / f"w{workers}")]
        runs[workers] = (params_of(result.bundle_dir), rows)
    assert max(r.get("epoch", 0.0) for r in runs[0][1]) > 1  # crossed an epoch boundary
    assert any("eval_mlm_loss" in r for r in runs[0][1])  # held-out rows present
    a, b = runs[0][0], runs[2][0]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert runs[0][1] == runs[2][1]
