"""Sharded inference: the shard plan, separate shard jobs + merge, resume, classifier prediction, and
two gloo ranks under torchrun (equality with one process, kill-and-resume, failing / hanging rank)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _tokenize_helpers import random_gene_bundle

from mixgeneformer.cli import main
from mixgeneformer.errors import ArtifactError, ConfigError
from mixgeneformer.sharding import (
    ShardRole,
    merge,
    plan_shards,
    rank_device,
    shard_folder,
    shard_role,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _free_port  # noqa: E402

N_GENES, N_CELLS = 300, 60


# ---------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_plan_is_contiguous_disjoint_complete_and_token_balanced(world):
    rng = np.random.default_rng(world)
    # long cells first, short cells after: equal cell counts would give shard 0 most of the work
    lengths = np.concatenate([rng.integers(1500, 2048, 300), rng.integers(50, 400, 700)])
    bounds = plan_shards(lengths, world)
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and len(bounds) == world + 1
    assert (np.diff(bounds) >= 0).all()  # contiguous ranges, together every cell exactly once
    tokens = np.add.reduceat(lengths, bounds[:-1]) if world > 1 else np.array([lengths.sum()])
    assert np.abs(tokens - lengths.sum() / world).max() <= lengths.max()
    if world > 1:
        counts = np.diff(bounds)
        assert counts[0] < counts[-1]  # balanced by tokens, not by cells
    np.testing.assert_array_equal(bounds, plan_shards(lengths.copy(), world))  # a pure function


def test_plan_with_more_shards_than_cells_leaves_empty_shards():
    bounds = plan_shards(np.array([5, 5, 5]), 5)
    assert bounds[0] == 0 and bounds[-1] == 3 and (np.diff(bounds) >= 0).all()
    assert np.diff(bounds).sum() == 3


def test_shard_role_from_arguments_or_launcher_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shard_role() == ShardRole(0, 1, False)
    assert shard_role(2, 3) == ShardRole(2, 3, False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert shard_role() == ShardRole(1, 4, True)
    assert shard_role(0, 2) == ShardRole(0, 2, False)  # explicit arguments win
    with pytest.raises(ConfigError, match="both"):
        shard_role(1, None)
    with pytest.raises(ConfigError, match="must be in"):
        shard_role(3, 3)


def test_each_launched_rank_takes_its_own_gpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_device(None) is None and rank_device("cuda") == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device(None) == "cuda:3" and rank_device("cuda") == "cuda:3"
    assert rank_device("cuda:1") == "cuda:1" and rank_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device(None) is None


# ---------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny random bundle over 300 real human genes; 60 cells of very different depths (two
    without any vocabulary gene) as .h5ad and as a tokenized corpus; a one-process reference."""
    import anndata as ad

    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files

    root = tmp_path_factory.mktemp("sharding")
    made = random_gene_bundle(root / "model", N_GENES, 20)
    ids, vocab, medians, model, bundle, rng = made.ids, made.vocab, made.medians, made.model, made.folder, made.rng

    depth = np.where(np.arange(N_CELLS) < 20, 2.0, 0.15)  # deep cells first: unequal token counts
    counts = rng.poisson(depth[:, None], size=(N_CELLS, N_GENES + 20)).astype(np.float32)
    counts[7] = 0
    counts[33, :N_GENES] = 0
    counts[33, N_GENES:] = 2
    obs = pd.DataFrame({"cell_type1": rng.choice(["alpha", "beta", "delta"], N_CELLS)},
                       index=[f"cell{i}" for i in range(N_CELLS)])
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=ids))
    h5ad = root / "cells.h5ad"
    adata.write_h5ad(h5ad)
    corpus = tokenize_files([h5ad], root / "corpus", vocab, medians, TokenizeConfig(max_len=128),
                            obs_columns=["cell_type1"])

    reference = root / "reference.h5ad"
    with pytest.warns(UserWarning, match="dropped"):
        _embed(h5ad, bundle, reference, "--gene-embeddings", str(root / "reference_genes.parquet"))
    return {"root": root, "bundle": bundle, "h5ad": h5ad, "corpus": corpus, "adata": adata, "model": model,
            "vocab": vocab, "medians": medians, "reference": reference}


def _embed(input, bundle, out, *extra):
    main(["embed", str(input), "--model", str(bundle), "--out", str(out), "--no-progress", "--device", "cpu",
          "--batch-size", "5", *extra])


def _assert_same_embedding(got_path, want_path, key="X_mixgeneformer"):
    import anndata as ad

    got, want = ad.read_h5ad(got_path), ad.read_h5ad(want_path)
    assert list(got.obs_names) == list(want.obs_names)
    pd.testing.assert_frame_equal(got.obs, want.obs)
    np.testing.assert_allclose(got.obsm[key], want.obsm[key], rtol=0, atol=1e-5, equal_nan=True)
    assert np.isnan(got.obsm[key]).any(axis=1).sum() == np.isnan(want.obsm[key]).any(axis=1).sum()
    if want.X is not None:
        np.testing.assert_array_equal(np.asarray(got.X), np.asarray(want.X))
    for field in ("layer", "pooling", "n_cells", "n_dropped", "model", "vocab_hash"):
        assert got.uns[f"{key}_params"][field] == want.uns[f"{key}_params"][field]
    return got


# ---------------------------------------------------------------------------- separate shard jobs
def test_separate_shard_jobs_then_merge_equal_one_process(data, tmp_path, capsys):
    out = tmp_path / "sharded.h5ad"
    genes = tmp_path / "genes.parquet"
    for index in range(3):
        _embed(data["h5ad"], data["bundle"], out, "--shard-index", str(index), "--num-shards", "3",
               "--gene-embeddings", str(genes))
    printed = capsys.readouterr().out
    assert printed.count(": computed") == 3 and "mixgf embed-merge" in printed
    assert not out.exists() and not genes.exists()  # nothing final before the merge

    # the shards are contiguous, disjoint, complete and balanced by tokens rather than by cells
    manifest = __import__("json").loads((shard_folder(out) / "manifest.json").read_text())
    bounds = manifest["bounds"]
    assert bounds[0] == 0 and bounds[-1] == N_CELLS and bounds == sorted(bounds)
    assert bounds[1] < N_CELLS / 3  # the deep cells come first

    main(["embed-merge", str(out)])
    _assert_same_embedding(out, data["reference"])
    want = pd.read_parquet(data["root"] / "reference_genes.parquet")
    got = pd.read_parquet(genes)
    assert list(got.index) == list(want.index)
    np.testing.assert_array_equal(got["n_cells"], want["n_cells"])
    np.testing.assert_allclose(got.drop(columns="n_cells"), want.drop(columns="n_cells"), rtol=0, atol=1e-5)
    assert not shard_folder(out).exists()  # removed once OUT is written


def test_a_corpus_folder_shards_the_same_way(data, tmp_path):
    reference, out = tmp_path / "one.h5ad", tmp_path / "two.h5ad"
    _embed(data["corpus"], data["bundle"], reference)
    for index in range(2):
        _embed(data["corpus"], data["bundle"], out, "--shard-index", str(index), "--num-shards", "2")
    main(["embed-merge", str(out)])
    got = _assert_same_embedding(out, reference)
    assert got.n_obs == N_CELLS - 2 and got.uns["X_mixgeneformer_params"]["shards"] == 2


def test_merge_of_an_h5ad_does_not_parse_the_recorded_tokenize_options(data, tmp_path):
    """The merge reads an h5ad (or a corpus) as always; the manifest's tokenize options serve the other
    count formats only. A manifest recording an option this version no longer has (shards of an older
    version) still merges."""
    import json

    (tmp_path / "tok.yaml").write_text("max_len: 64\n")
    one, out = tmp_path / "one.h5ad", tmp_path / "old.h5ad"
    with pytest.warns(UserWarning, match="dropped"):
        _embed(data["h5ad"], data["bundle"], one, "--tokenize-config", tmp_path / "tok.yaml")
        for index in range(2):
            _embed(data["h5ad"], data["bundle"], out, "--shard-index", str(index), "--num-shards", "2",
                   "--tokenize-config", tmp_path / "tok.yaml")
    path = shard_folder(out) / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["options"]["tokenize"]["max_len"] == 64
    manifest["options"]["tokenize"]["retired_option"] = 1
    path.write_text(json.dumps(manifest))
    main(["embed-merge", str(out)])
    _assert_same_embedding(out, one)


def test_rerun_recomputes_only_missing_or_stale_shards(data, tmp_path, capsys):
    out = tmp_path / "resumed.h5ad"
    args = ("--num-shards", "2")
    _embed(data["h5ad"], data["bundle"], out, "--shard-index", "0", *args)
    first = shard_folder(out) / "shard-00000-of-00002.npz"
    stamp = first.stat().st_mtime_ns
    with pytest.raises(ArtifactError, match=r"1 of 2 shards are missing or stale .*indices \[1\]"):
        merge(out)

    capsys.readouterr()
    _embed(data["h5ad"], data["bundle"], out, "--shard-index", "0", *args)  # the same job again
    assert ": reused" in capsys.readouterr().out and first.stat().st_mtime_ns == stamp

    # another layer changes the numbers: shard 0 is stale
    _embed(data["h5ad"], data["bundle"], out, "--shard-index", "0", *args, "--layer", "-1")
    assert ": computed" in capsys.readouterr().out and first.stat().st_mtime_ns != stamp
    _embed(data["h5ad"], data["bundle"], out, "--shard-index", "0", *args)

    first.write_bytes(first.read_bytes()[:100])  # a truncated shard is recomputed, not trusted
    capsys.readouterr()
    _embed(data["h5ad"], data["bundle"], out, "--shard-index", "0", *args)
    assert ": computed" in capsys.readouterr().out
    _embed(data["h5ad"], data["bundle"], out, "--shard-index", "1", *args)

    os.utime(data["bundle"] / "config.json")  # the model changed since
    with pytest.raises(ArtifactError, match="changed since"):
        merge(out)
    _embed(data["h5ad"], data["bundle"], out, "--shard-index", "0", *args)
    _embed(data["h5ad"], data["bundle"], out, "--shard-index", "1", *args)
    main(["embed-merge", str(out)])
    _assert_same_embedding(out, data["reference"])


# ---------------------------------------------------------------------------- prediction
def test_sharded_prediction_equals_one_process(data, tmp_path, capsys):
    import anndata as ad

    from mixgeneformer.classify import (
        ClassifyConfig,
        FinetuneConfig,
        FittedClassifier,
        build_classifier,
    )

    classes = ["alpha", "beta", "delta"]
    torch.manual_seed(1)
    # The fixture's cells carry no <cls> (style v1): pool by the mean, as fit_classifier would resolve it.
    classifier = build_classifier(data["model"], classes, data["vocab"], FinetuneConfig(pooling="mean"))
    folder = FittedClassifier(classifier, classes, data["vocab"], data["medians"], ClassifyConfig(), []).save(
        tmp_path / "classifier"
    )
    one, two = tmp_path / "one.h5ad", tmp_path / "two.h5ad"
    main(["predict", str(data["h5ad"]), "--classifier", str(folder), "--out", str(one), "--device", "cpu"])
    for index in range(2):
        main(["predict", str(data["h5ad"]), "--classifier", str(folder), "--out", str(two), "--device", "cpu",
              "--shard-index", str(index), "--num-shards", "2", "--batch-size", "3"])
    with pytest.raises(SystemExit):  # embed-merge refuses prediction shards
        main(["embed-merge", str(two)])
    assert "use mixgf predict-merge" in capsys.readouterr().err
    main(["predict-merge", str(two)])
    want, got = ad.read_h5ad(one), ad.read_h5ad(two)
    assert list(got.obs_names) == list(data["adata"].obs_names)
    np.testing.assert_allclose(got.obsm["predicted_probabilities"], want.obsm["predicted_probabilities"],
                               rtol=0, atol=1e-5, equal_nan=True)
    pd.testing.assert_series_equal(got.obs["predicted_pred"], want.obs["predicted_pred"])
    assert got.obs["predicted_pred"].isna().sum() == 2  # the cells without a vocabulary gene
    assert set(got.obs["predicted_pred"].dropna()) <= set(classes)
    assert got.uns["predicted_params"]["n_dropped"] == want.uns["predicted_params"]["n_dropped"] == 2


# ---------------------------------------------------------------------------- torchrun, 2 gloo ranks
def _torchrun(args: list[str], env: dict[str, str] | None = None, timeout: float = 240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mixgeneformer", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("MIXGF_TEST_FAIL_SHARD", "MIXGF_TEST_HANG_SHARD"):
        if env is None or name not in env:
            full_env.pop(name, None)
    start = time.time()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start, proc.stdout + proc.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_kill_and_resume_equal_one_process(data, tmp_path):
    out = tmp_path / "launched.h5ad"
    args = ["embed", str(data["h5ad"]), "--model", str(data["bundle"]), "--out", str(out), "--no-progress",
            "--device", "cpu", "--batch-size", "5"]
    # rank 1 fails after rank 0 finished its shard (rank 0 is then waiting at the barrier)
    proc, elapsed, log = _torchrun(args, {"MIXGF_TEST_FAIL_SHARD": "1"})
    assert proc.returncode != 0, log[-3000:]
    assert "injected failure on shard 1" in log
    assert elapsed < 180
    folder = shard_folder(out)
    assert sorted(p.name for p in folder.glob("*.npz")) == ["shard-00000-of-00002.npz"]
    assert not out.exists()

    proc, _, log = _torchrun(args)  # the rerun recomputes only the missing shard
    assert proc.returncode == 0, log[-3000:]
    assert "shard 1/2 (cells 0-" in log and ": reused" in log
    assert "shard 2/2" in log and log.count(": computed") == 1
    _assert_same_embedding(out, data["reference"])
    assert not folder.exists()


@pytest.mark.slow
def test_a_hanging_rank_ends_the_launch_after_the_timeout(data, tmp_path):
    out = tmp_path / "hung.h5ad"
    proc, elapsed, log = _torchrun(
        ["embed", str(data["h5ad"]), "--model", str(data["bundle"]), "--out", str(out), "--no-progress",
         "--device", "cpu", "--timeout", "5"],
        {"MIXGF_TEST_HANG_SHARD": "1"},
    )
    assert proc.returncode != 0, log[-3000:]
    assert "did not reach the end of its shard within 5 s" in log
    assert elapsed < 150
    assert not out.exists()
