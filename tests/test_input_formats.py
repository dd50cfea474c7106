"""The model commands (embed, predict, classify, perturb) read every count format the tokenizer reads:
real Baron cells written as .h5ad, .loom, 10x .h5, a 10x matrix.mtx folder and a TileDB-SOMA experiment
give the same numbers as the .h5ad, in one process and sharded; a folder of none of them exits 2."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _tokenize_helpers import cli_exit_code
from test_classify import baron_subset, tiny_bundle  # noqa: F401  (the tiny Baron model bundle fixture)
from test_readers import write_10x_h5, write_mtx

from mixgeneformer.cli import main
from mixgeneformer.readers import read_anndata

CLASSES = ["acinar", "alpha", "beta", "ductal"]
OBS = ["cell_type1", "donor", "n_counts"]
KEY = "X_mixgeneformer"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, baron_data):
    """200 real Baron human cells (their 2,500 most counted genes: fast gene mapping), ``n_counts`` their
    row sums (so formats without obs normalize alike), in every format; the tiny bundle's classifier."""
    root = tmp_path_factory.mktemp("formats")
    cells = baron_subset(baron_data / "baron_pancreas_human.h5ad", 50, CLASSES, seed=1)
    top = np.sort(np.argsort(-np.asarray(cells.X.sum(axis=0)).ravel(), kind="stable")[:2500])
    cells = cells[:, top].copy()
    cells.obs = cells.obs[["cell_type1", "donor"]].copy()
    cells.obs["n_counts"] = np.asarray(cells.X.sum(axis=1)).ravel().astype(np.int64)
    cells.obs.index.name = cells.var.index.name = None  # write_loom names the row / column attributes after them
    paths = {"h5ad": root / "cells.h5ad", "loom": root / "cells.loom", "10x_h5": root / "cells.h5", "10x_mtx": root / "mtx"}
    cells.write_h5ad(paths["h5ad"])
    cells.write_loom(paths["loom"])
    write_10x_h5(cells, paths["10x_h5"])
    write_mtx(cells, paths["10x_mtx"])
    try:
        import tiledbsoma.io

        tiledbsoma.io.from_h5ad(str(root / "soma"), str(paths["h5ad"]), measurement_name="RNA")
        paths["soma"] = root / "soma"
    except ImportError:  # the SOMA cases are skipped (see `formats`)
        pass
    return cells, paths, root


@pytest.fixture(scope="module")
def classifier(inputs, tiny_bundle):  # noqa: F811
    """A random (untrained) classifier of the four cell types over the tiny bundle's model."""
    import torch

    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.classify import (
        ClassifyConfig,
        FinetuneConfig,
        FittedClassifier,
        build_classifier,
    )

    model, vocab, medians = load_bundle(tiny_bundle[0])
    torch.manual_seed(3)
    head = build_classifier(model, CLASSES, vocab, FinetuneConfig(pooling="mean"))
    return FittedClassifier(head, CLASSES, vocab, medians, ClassifyConfig(), []).save(inputs[2] / "classifier")


FORMATS = ["loom", "10x_h5", "10x_mtx", "soma"]
WITH_OBS = {"loom", "soma"}  # the formats that carry obs columns (10x keeps the barcodes only)


def _path(inputs, fmt):
    if fmt not in inputs[1]:
        pytest.skip("tiledbsoma is not installed")
    return inputs[1][fmt]


def _same_cells(got: ad.AnnData, want: ad.AnnData, fmt: str) -> None:
    assert list(got.obs_names) == list(want.obs_names)
    if fmt in WITH_OBS:
        for column in OBS:
            assert got.obs[column].astype(str).tolist() == want.obs[column].astype(str).tolist(), column


def _embed(input, bundle, out, *extra) -> None:
    main(["embed", str(input), "-m", str(bundle), "-o", str(out), "--device", "cpu", "--no-progress", *map(str, extra)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_anndata_gives_the_h5ad_counts_genes_and_obs(inputs, fmt):
    cells, _, _ = inputs
    path = _path(inputs, fmt)
    whole = read_anndata(path, chunk_size=37)  # several chunks
    assert sp.issparse(whole.X) and whole.X.format == "csr"
    assert (whole.X != cells.X).nnz == 0
    assert list(whole.var_names) == list(cells.var_names)
    _same_cells(whole, cells, fmt)
    part = read_anndata(path, (60, 131), chunk_size=25)  # a shard's cells
    assert (part.X != cells.X[60:131]).nnz == 0 and list(part.obs_names) == list(cells.obs_names[60:131])


def test_read_anndata_keeps_layer_and_gene_column_names_for_the_tokenizer(inputs):
    """An input read with a layer / gene column holds them under those names too, so the same tokenize
    options read the AnnData as they read the file."""
    from mixgeneformer.readers import open_source

    cells, paths, root = inputs
    loom = root / "layered.loom"
    layered = cells.copy()
    layered.layers["counts"] = cells.X.copy()
    layered.X = sp.csr_matrix(cells.X.astype(np.float32) / 3)  # not counts
    layered.var["gene"] = [f"G{i}" for i in range(cells.n_vars)]
    layered.write_loom(loom)
    read = read_anndata(loom, layer="counts", gene_column="gene")
    assert (read.X != cells.X).nnz == 0 and read.layers["counts"] is read.X
    assert list(read.var_names) == list(read.var["gene"]) == list(layered.var["gene"])
    with open_source(read, layer="counts", gene_column="gene") as again, open_source(loom, "counts", "gene") as file:
        assert list(again.gene_ids) == list(file.gene_ids)
        assert (next(again.iter_chunks(500)).counts != next(file.iter_chunks(500)).counts).nnz == 0


@pytest.fixture(scope="module")
def h5ad_embedding(inputs, tiny_bundle):  # noqa: F811
    out = inputs[2] / "embedded.h5ad"
    _embed(inputs[1]["h5ad"], tiny_bundle[0], out)
    want = ad.read_h5ad(out)
    assert np.isfinite(want.obsm[KEY]).all()
    return want


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed_every_format_equals_the_h5ad_one_process_and_sharded(inputs, tiny_bundle, h5ad_embedding, fmt,  # noqa: F811
                                                                     tmp_path):
    cells, want, bundle = inputs[0], h5ad_embedding, tiny_bundle[0]
    path = _path(inputs, fmt)
    _embed(path, bundle, tmp_path / "one.h5ad")
    got = ad.read_h5ad(tmp_path / "one.h5ad")
    _same_cells(got, want, fmt)
    np.testing.assert_allclose(got.obsm[KEY], want.obsm[KEY], rtol=0, atol=1e-6)
    assert (got.X != cells.X).nnz == 0  # the output holds the input's counts, as the h5ad's does
    sharded = tmp_path / "sharded.h5ad"
    for index in range(2):
        _embed(path, bundle, sharded, "--shard-index", index, "--num-shards", 2)
    assert not sharded.exists()
    main(["embed-merge", str(sharded)])
    merged = ad.read_h5ad(sharded)
    _same_cells(merged, want, fmt)
    np.testing.assert_allclose(merged.obsm[KEY], want.obsm[KEY], rtol=0, atol=1e-6)
    assert merged.uns[f"{KEY}_params"]["shards"] == 2 and (merged.X != cells.X).nnz == 0


def test_embed_file_api_reads_a_loom(inputs, tiny_bundle):  # noqa: F811
    from mixgeneformer.embed import embed_file

    _, paths, _ = inputs
    want, _ = embed_file(paths["h5ad"], tiny_bundle[0], device="cpu", progress=False)
    got, _ = embed_file(paths["loom"], tiny_bundle[0], device="cpu", progress=False)
    _same_cells(got, want, "loom")
    np.testing.assert_allclose(got.obsm[KEY], want.obsm[KEY], rtol=0, atol=1e-6)


def _predict(input, classifier, out, *extra) -> None:
    main(["predict", str(input), "-c", str(classifier), "-o", str(out), "--device", "cpu", *map(str, extra)])


@pytest.fixture(scope="module")
def h5ad_prediction(inputs, classifier):
    _predict(inputs[1]["h5ad"], classifier, inputs[2] / "predicted.h5ad")
    want = ad.read_h5ad(inputs[2] / "predicted.h5ad")
    assert want.obs["predicted_pred"].notna().all()
    return want


def _same_prediction(got: ad.AnnData, want: ad.AnnData, fmt: str) -> None:
    _same_cells(got, want, fmt)
    assert got.obs["predicted_pred"].tolist() == want.obs["predicted_pred"].tolist()
    np.testing.assert_allclose(got.obsm["predicted_probabilities"], want.obsm["predicted_probabilities"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_every_format_equals_the_h5ad(inputs, classifier, h5ad_prediction, fmt, tmp_path):
    path = _path(inputs, fmt)
    _predict(path, classifier, tmp_path / "one.h5ad")
    _same_prediction(ad.read_h5ad(tmp_path / "one.h5ad"), h5ad_prediction, fmt)
    if fmt in ("10x_mtx", "soma"):  # the folders, sharded
        for index in range(2):
            _predict(path, classifier, tmp_path / "sharded.h5ad", "--shard-index", index, "--num-shards", 2)
        main(["predict-merge", str(tmp_path / "sharded.h5ad")])
        _same_prediction(ad.read_h5ad(tmp_path / "sharded.h5ad"), h5ad_prediction, fmt)


def test_predict_refuses_a_loom_obs_column_it_would_replace(inputs, classifier, tmp_path, capsys):
    cells, _, root = inputs
    taken = cells.copy()
    taken.obs["predicted_pred"] = "x"
    taken.write_loom(root / "taken.loom")
    assert cli_exit_code(["predict", str(root / "taken.loom"), "-c", str(classifier), "-o", str(tmp_path / "p.h5ad"),
                          "--device", "cpu"]) == 2
    assert "already holds obs['predicted_pred']" in capsys.readouterr().err
    assert not (tmp_path / "p.h5ad").exists()


def test_perturb_every_format_equals_the_h5ad(inputs, tiny_bundle, tmp_path):  # noqa: F811
    from mixgeneformer.perturb import PerturbConfig, perturb_file

    _, paths, _ = inputs
    config = PerturbConfig(genes=["INS", "GCG"], device="cpu")
    want, _ = perturb_file(paths["h5ad"], tiny_bundle[0], config, progress=False)
    assert len(want.cells) > 50
    for fmt in FORMATS:
        if fmt in paths:
            got, _ = perturb_file(paths[fmt], tiny_bundle[0], config, progress=False)
            pd.testing.assert_frame_equal(got.cells, want.cells, check_exact=False, rtol=0, atol=1e-6)
    out = tmp_path / "loom_perturb"
    main(["perturb", str(paths["loom"]), "-m", str(tiny_bundle[0]), "-o", str(out), "--genes", "INS,GCG",
          "--device", "cpu", "--no-progress"])
    table = pd.read_parquet(out / "cells.parquet")
    np.testing.assert_allclose(table["shift"], want.cells["shift"], rtol=0, atol=1e-6)


def _classify(input, bundle, out, *extra) -> pd.DataFrame:
    main(["classify", str(input), "-m", str(bundle), "-o", str(out), "--mode", "zero-shot", "--device", "cpu",
          *map(str, extra)])
    return pd.read_csv(out / "metrics.csv")


def test_classify_formats_with_labels_equal_the_h5ad_and_10x_says_it_has_none(inputs, tiny_bundle, tmp_path,  # noqa: F811
                                                                                 capsys):
    _, paths, _ = inputs
    bundle = tiny_bundle[0]
    want = _classify(paths["h5ad"], bundle, tmp_path / "h5ad")
    for fmt in sorted(WITH_OBS & set(paths)):
        pd.testing.assert_frame_equal(_classify(paths[fmt], bundle, tmp_path / fmt), want)
    with_test = _classify(paths["h5ad"], bundle, tmp_path / "test_loom", "--test", paths["loom"])  # mixed formats
    assert set(with_test["method"]) == set(want["method"]) and with_test["macro_f1"].notna().all()
    code = cli_exit_code(["classify", str(paths["10x_mtx"]), "-m", str(bundle), "-o", str(tmp_path / "tenx"),
                          "--mode", "zero-shot", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "label column 'cell_type1' not found" in err and "Traceback" not in err
    assert not (tmp_path / "tenx").exists()


def test_a_folder_of_no_count_format_exits_2_with_one_message(inputs, tiny_bundle, classifier, tmp_path,  # noqa: F811
                                                               capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no counts here")
    commands = {
        "embed": ["embed", str(folder), "-m", str(tiny_bundle[0]), "-o", str(tmp_path / "e.h5ad")],
        "predict": ["predict", str(folder), "-c", str(classifier), "-o", str(tmp_path / "p.h5ad")],
        "perturb": ["perturb", str(folder), "-m", str(tiny_bundle[0]), "-o", str(tmp_path / "perturbed")],
        "classify": ["classify", str(folder), "-m", str(tiny_bundle[0]), "-o", str(tmp_path / "c")],
    }
    for name, args in commands.items():
        assert cli_exit_code(args) == 2, name
        err = capsys.readouterr().err
        assert f"input {folder} is a folder but neither" in err and "TileDB-SOMA experiment" in err, (name, err)
        assert "Traceback" not in err and err.count("\n") <= 3, (name, err)
        assert ("tokenized corpus" in err) == (name != "classify"), name  # classify reads no corpus
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
