"""Audit of sharded prediction (``mixgf predict`` with --shard-index / --num-shards, then
``mixgf predict-merge``) against a one-process run, on the shard edge cases embed's tests cover:
a shard none of whose cells holds a vocabulary gene, an input without any such cell, more shards
than cells, a tokenized corpus folder, tokenize options given with a corpus.

The one-process run is the reference: the merged file must hold the same probabilities (NaN rows
for the cells the tokenizer dropped, never shifted rows), the same labels and the same counts.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from _tokenize_helpers import cells_partly_outside, random_gene_bundle

from mixgeneformer.cli import main
from mixgeneformer.sharding import shard_folder

CLASSES = ["a", "b"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny random classifier; 30 cells, of which cells 0-19 hold counts only outside the
    vocabulary (long cells: the first shard of three holds only them) and cell 24 none at all."""

    from mixgeneformer.classify import (
        ClassifyConfig,
        FinetuneConfig,
        FittedClassifier,
        build_classifier,
    )
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files

    root = tmp_path_factory.mktemp("audit_predict")
    bundle = random_gene_bundle(root / "model", 100, 20)
    adata = cells_partly_outside(bundle, list(CLASSES))
    path = root / "cells.h5ad"
    adata.write_h5ad(path)
    torch.manual_seed(2)
    # style v1 cells carry no <cls>: pool by the mean, as fit_classifier would resolve it
    model = build_classifier(bundle.model, CLASSES, bundle.vocab, FinetuneConfig(pooling="mean"))
    classifier = FittedClassifier(model, CLASSES, bundle.vocab, bundle.medians, ClassifyConfig(), []).save(
        root / "classifier")
    usable = root / "usable.h5ad"  # cells 18-25: two gene-less cells, then six (one of them empty)
    adata[18:26].copy().write_h5ad(usable)
    empty = root / "empty.h5ad"  # no cell holds a vocabulary gene
    adata[:20].copy().write_h5ad(empty)
    corpus = tokenize_files([path], root / "corpus", bundle.vocab, bundle.medians, TokenizeConfig(max_len=64),
                            obs_columns=["cell_type1"])
    return {"root": root, "h5ad": path, "usable": usable, "empty": empty, "corpus": corpus,
            "classifier": classifier}


def _predict(input, classifier, out, *extra) -> None:
    main(["predict", str(input), "--classifier", str(classifier), "--out", str(out), "--device", "cpu",
          "--batch-size", "4", *map(str, extra)])


def _sharded(input, classifier, out, world: int) -> None:
    for index in range(world):
        _predict(input, classifier, out, "--shard-index", index, "--num-shards", world)
    main(["predict-merge", str(out)])


def _assert_same_prediction(got_path, want_path, key: str = "predicted"):
    import anndata as ad

    got, want = ad.read_h5ad(got_path), ad.read_h5ad(want_path)
    assert list(got.obs_names) == list(want.obs_names)
    np.testing.assert_allclose(got.obsm[f"{key}_probabilities"], want.obsm[f"{key}_probabilities"],
                               rtol=0, atol=1e-5, equal_nan=True)
    pd.testing.assert_series_equal(got.obs[f"{key}_pred"], want.obs[f"{key}_pred"])
    np.testing.assert_allclose(got.obs[f"{key}_prob"], want.obs[f"{key}_prob"], rtol=0, atol=1e-5, equal_nan=True)
    assert list(got.uns[f"{key}_classes"]) == list(want.uns[f"{key}_classes"]) == CLASSES
    for field in ("classifier", "n_cells", "n_dropped"):
        assert got.uns[f"{key}_params"][field] == want.uns[f"{key}_params"][field], field
    return got, want


def test_a_shard_whose_cells_all_lack_vocabulary_genes_gives_nan_predictions_like_one_process(made, tmp_path):
    one, sharded = tmp_path / "one.h5ad", tmp_path / "sharded.h5ad"
    _predict(made["h5ad"], made["classifier"], one)
    with pytest.warns(UserWarning, match="none of the .* cells of this shard could be tokenized"):
        _predict(made["h5ad"], made["classifier"], sharded, "--shard-index", 0, "--num-shards", 3)
    bounds = json.loads((shard_folder(sharded) / "manifest.json").read_text())["bounds"]
    assert 0 < bounds[1] <= 20  # shard 0 holds only cells without a vocabulary gene
    for index in (1, 2):
        _predict(made["h5ad"], made["classifier"], sharded, "--shard-index", index, "--num-shards", 3)
    main(["predict-merge", str(sharded)])
    got, want = _assert_same_prediction(sharded, one)
    dropped = np.r_[np.arange(20), 24]
    assert np.isnan(got.obsm["predicted_probabilities"][dropped]).all()
    assert np.isfinite(np.delete(got.obsm["predicted_probabilities"], dropped, axis=0)).all()
    assert got.obs["predicted_pred"].isna().to_numpy().nonzero()[0].tolist() == dropped.tolist()
    assert got.uns["predicted_params"]["n_dropped"] == 21 and got.uns["predicted_params"]["n_cells"] == 30


def test_a_sharded_prediction_without_any_tokenizable_cell_fails_like_one_process(made, tmp_path):
    with pytest.raises(SystemExit) as one:
        _predict(made["empty"], made["classifier"], tmp_path / "one.h5ad")
    assert one.value.code == 2 and not (tmp_path / "one.h5ad").exists()
    out = tmp_path / "sharded.h5ad"
    for index in range(2):
        with pytest.warns(UserWarning, match="could be tokenized"):
            _predict(made["empty"], made["classifier"], out, "--shard-index", index, "--num-shards", 2)
    with pytest.raises(SystemExit) as merged:
        main(["predict-merge", str(out)])
    assert merged.value.code == 2 and not out.exists()


def test_more_shards_than_cells_equal_one_process(made, tmp_path):
    one, sharded = tmp_path / "one.h5ad", tmp_path / "sharded.h5ad"
    _predict(made["usable"], made["classifier"], one)
    with pytest.warns(UserWarning):
        _sharded(made["usable"], made["classifier"], sharded, 11)  # 8 cells: some shards are empty
    got, _ = _assert_same_prediction(sharded, one)
    assert got.uns["predicted_params"]["n_dropped"] == 3 and got.uns["predicted_params"]["shards"] == 11


def test_a_corpus_folder_predicts_the_same_sharded(made, tmp_path):
    one, sharded = tmp_path / "one.h5ad", tmp_path / "sharded.h5ad"
    _predict(made["corpus"], made["classifier"], one)
    _sharded(made["corpus"], made["classifier"], sharded, 3)
    got, want = _assert_same_prediction(sharded, one)
    assert got.n_obs == 9 and np.isfinite(got.obsm["predicted_probabilities"]).all()
    pd.testing.assert_series_equal(got.obs["cell_type1"], want.obs["cell_type1"])


@pytest.mark.parametrize("shards", [(), ("--shard-index", 0, "--num-shards", 2)])
def test_tokenize_config_with_a_corpus_folder_is_refused_not_ignored(made, tmp_path, shards, capsys):
    config = tmp_path / "t.yaml"
    config.write_text("layer: counts\n")
    out = tmp_path / "o.h5ad"
    with pytest.raises(SystemExit) as exit_:
        _predict(made["corpus"], made["classifier"], out, "--tokenize-config", config, *shards)
    assert exit_.value.code == 2 and "--tokenize-config" in capsys.readouterr().err
    assert not out.exists() and not shard_folder(out).exists()
