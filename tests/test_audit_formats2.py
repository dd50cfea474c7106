"""Audit of the model commands reading every count format (readers/cells.py, sharding.py, embed/run.py):
faults found on real Baron cells written as .loom, each a regression test that fails on the code before the fix.

* A sharded ``mixgf embed LOOM --gene-column NAME`` of a loom whose genes sit under no default row attribute
  exited 2 ("no gene identifier row attribute found") where the one-process run worked: the shard planner
  (``cell_lengths``) and the sharded input check (``input_obs``) opened the loom without ``--gene-column``.
* A loom with a 2-D column attribute (anndata's ``write_loom(write_obsm_varm=True)``, loompy / velocyto
  embeddings) was refused as "damaged" by every model command: ``read_anndata`` read each column attribute
  as an obs column. It is now read as obsm, as ``anndata.read_loom`` does.
* The shard planner of a sharded run read a loom in dense slabs of 65,536 cells (tens of GB for a
  30,000-gene loom), not in the configured ``chunk_size`` every other read of it uses.
"""

from __future__ import annotations

import shutil

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from _tokenize_helpers import cli_exit_code
from test_classify import baron_subset, tiny_bundle  # noqa: F401  (the tiny Baron model bundle fixture)

from mixgeneformer.cli import main

KEY = "X_mixgeneformer"


@pytest.fixture(scope="module")
def cells_files(tmp_path_factory, baron_data):
    """80 real Baron human cells (their 1,500 most counted genes) as .h5ad and .loom."""
    root = tmp_path_factory.mktemp("formats2")
    cells = baron_subset(baron_data / "baron_pancreas_human.h5ad", 20, ["acinar", "alpha", "beta", "ductal"], seed=2)
    top = np.sort(np.argsort(-np.asarray(cells.X.sum(axis=0)).ravel(), kind="stable")[:1500])
    cells = cells[:, top].copy()
    cells.obs = cells.obs[["cell_type1", "donor"]].copy()
    cells.obs.index.name = cells.var.index.name = None
    cells.write_h5ad(root / "cells.h5ad")
    cells.write_loom(root / "cells.loom")
    return cells, root


@pytest.fixture(scope="module")
def h5ad_embedding(cells_files, tiny_bundle):  # noqa: F811
    out = cells_files[1] / "embedded.h5ad"
    _embed(cells_files[1] / "cells.h5ad", tiny_bundle[0], out)
    return ad.read_h5ad(out)


def _embed(input, bundle, out, *extra) -> None:
    main(["embed", str(input), "-m", str(bundle), "-o", str(out), "--device", "cpu", "--no-progress", *map(str, extra)])


def _sharded(input, bundle, out, *extra) -> ad.AnnData:
    for index in range(2):
        assert cli_exit_code(["embed", input, "-m", bundle, "-o", out, "--device", "cpu", "--no-progress", *extra,
                              "--shard-index", index, "--num-shards", 2]) == 0
    main(["embed-merge", str(out)])
    return ad.read_h5ad(out)


def test_sharded_embed_of_a_loom_reads_its_genes_with_gene_column(cells_files, tiny_bundle, h5ad_embedding,  # noqa: F811
                                                                  tmp_path, capsys):
    """Fault: the shard planner and the sharded input check opened the loom without --gene-column."""
    loom = tmp_path / "renamed.loom"
    shutil.copy(cells_files[1] / "cells.loom", loom)
    with h5py.File(loom, "r+") as f:
        f["row_attrs"].move("var_names", "my_ids")  # no default gene attribute left
    _embed(loom, tiny_bundle[0], tmp_path / "one.h5ad", "--gene-column", "my_ids")
    one = ad.read_h5ad(tmp_path / "one.h5ad")
    np.testing.assert_allclose(one.obsm[KEY], h5ad_embedding.obsm[KEY], rtol=0, atol=1e-6)
    merged = _sharded(loom, tiny_bundle[0], tmp_path / "sharded.h5ad", "--gene-column", "my_ids")
    assert "Traceback" not in capsys.readouterr().err
    assert list(merged.obs_names) == list(one.obs_names)
    np.testing.assert_allclose(merged.obsm[KEY], one.obsm[KEY], rtol=0, atol=1e-6)
    assert list(merged.var_names) == list(one.var_names) == list(cells_files[0].var_names)


def test_a_loom_with_a_2d_column_attribute_is_read_with_it_as_obsm(cells_files, tiny_bundle, h5ad_embedding,  # noqa: F811
                                                                    tmp_path):
    """Fault: every column attribute was read as an obs column; a 2-D one made the loom 'damaged'."""
    from mixgeneformer.readers import open_source, read_anndata

    cells = cells_files[0].copy()
    umap = np.random.default_rng(0).normal(size=(cells.n_obs, 2))
    cells.obsm["X_umap"] = umap
    loom = tmp_path / "obsm.loom"
    cells.write_loom(loom, write_obsm_varm=True)
    read = read_anndata(loom, chunk_size=30)  # several chunks
    assert list(read.obs.columns) == ["cell_type1", "donor"] and list(read.obs_names) == list(cells.obs_names)
    np.testing.assert_allclose(read.obsm["X_umap"], umap)
    assert (read.X != sp.csr_matrix(cells.X)).nnz == 0
    np.testing.assert_allclose(read_anndata(loom, (25, 61)).obsm["X_umap"], umap[25:61])  # a shard's cells
    with open_source(loom) as source:
        assert "X_umap" not in source.obs_columns  # no obs column (mixgf tokenize --obs-columns lists the real ones)
    _embed(loom, tiny_bundle[0], tmp_path / "one.h5ad")
    one = ad.read_h5ad(tmp_path / "one.h5ad")
    np.testing.assert_allclose(one.obsm[KEY], h5ad_embedding.obsm[KEY], rtol=0, atol=1e-6)
    np.testing.assert_allclose(one.obsm["X_umap"], umap)
    merged = _sharded(loom, tiny_bundle[0], tmp_path / "sharded.h5ad")
    np.testing.assert_allclose(merged.obsm[KEY], one.obsm[KEY], rtol=0, atol=1e-6)
    np.testing.assert_allclose(merged.obsm["X_umap"], umap)


def test_the_shard_planner_reads_a_loom_in_the_configured_chunks(cells_files, monkeypatch):
    """Fault: cell_lengths read a loom (dense genes x cells) in slabs of 65,536 cells."""
    from mixgeneformer.readers.formats import _LoomSource
    from mixgeneformer.sharding import cell_lengths
    from mixgeneformer.tokenize import TokenizeConfig

    cells, root = cells_files
    widths = []
    read_rows = _LoomSource._read_rows

    def spy(self, start, stop):
        widths.append(stop - start)
        return read_rows(self, start, stop)

    monkeypatch.setattr(_LoomSource, "_read_rows", spy)
    lengths = cell_lengths(root / "cells.loom", TokenizeConfig(chunk_size=16, max_len=2048))
    assert widths and max(widths) <= 16
    np.testing.assert_array_equal(lengths, np.minimum(np.diff(sp.csr_matrix(cells.X).indptr), 2048))
    h5ad = cell_lengths(root / "cells.h5ad", TokenizeConfig(chunk_size=16, max_len=2048))  # an h5ad: its row pointer
    np.testing.assert_array_equal(h5ad, lengths)


def test_a_soma_experiment_with_nullable_obs_columns_is_embedded_and_written(cells_files, tiny_bundle,  # noqa: F811
                                                                               h5ad_embedding, tmp_path, capsys):
    """Fault: a SOMA nullable bool column reads as Python objects (True / None), which anndata cannot write:
    `mixgf embed` (and predict, classify) ended in a TypeError traceback after all the work, nothing written."""
    pd = pytest.importorskip("pandas")
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    cells = cells_files[0].copy()
    cells.obs["flag"] = pd.array([True, None, False, None] * (cells.n_obs // 4), dtype="boolean")
    cells.obs["score"] = pd.array([3, None] * (cells.n_obs // 2), dtype="Int64")
    cells.write_h5ad(tmp_path / "nullable.h5ad")
    tiledbsoma_io.from_h5ad(str(tmp_path / "soma"), str(tmp_path / "nullable.h5ad"), measurement_name="RNA")
    code = cli_exit_code(["embed", tmp_path / "soma", "-m", tiny_bundle[0], "-o", tmp_path / "e.h5ad", "--device", "cpu",
                          "--no-progress"])
    assert code == 0 and "Traceback" not in capsys.readouterr().err
    got = ad.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_allclose(got.obsm[KEY], h5ad_embedding.obsm[KEY], rtol=0, atol=1e-6)
    assert got.obs["flag"].tolist() == cells.obs["flag"].tolist()  # missing values kept missing, not "None" / False
    assert got.obs["score"].astype("Float64").tolist() == cells.obs["score"].astype("Float64").tolist()


def test_predict_refuses_a_loom_obsm_entry_it_would_replace(cells_files, tiny_bundle, tmp_path, capsys):  # noqa: F811
    """A loom's 2-D column attribute is now read as obsm: predict refuses to replace one as it does for an h5ad."""
    import torch

    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.classify import (
        ClassifyConfig,
        FinetuneConfig,
        FittedClassifier,
        build_classifier,
    )

    model, vocab, medians = load_bundle(tiny_bundle[0])
    classes = ["acinar", "alpha", "beta", "ductal"]
    torch.manual_seed(0)
    head = build_classifier(model, classes, vocab, FinetuneConfig(pooling="mean"))
    classifier = FittedClassifier(head, classes, vocab, medians, ClassifyConfig(), []).save(tmp_path / "classifier")
    cells = cells_files[0].copy()
    cells.obsm["predicted_probabilities"] = np.full((cells.n_obs, 4), 0.25)
    cells.write_loom(tmp_path / "taken.loom", write_obsm_varm=True)
    args = ["predict", tmp_path / "taken.loom", "-c", classifier, "-o", tmp_path / "p.h5ad", "--device", "cpu"]
    assert cli_exit_code(args) == 2
    assert "already holds obsm['predicted_probabilities']" in capsys.readouterr().err
    assert not (tmp_path / "p.h5ad").exists()
    assert cli_exit_code([*args, "--overwrite"]) == 0
    replaced = ad.read_h5ad(tmp_path / "p.h5ad").obsm["predicted_probabilities"]
    assert replaced.shape == (cells.n_obs, 4) and not np.allclose(replaced, 0.25)


def test_a_two_genome_cellranger_v2_h5_says_what_it_is(cells_files, tiny_bundle, tmp_path, capsys):  # noqa: F811
    """Was "not a recognised 10x .h5 file": a CellRanger v2 file of two genomes (a barnyard) is one, of two genomes."""
    cells = cells_files[0]
    csc = sp.csc_matrix(cells.X.T)
    with h5py.File(tmp_path / "barnyard.h5", "w") as f:
        for genome in ("GRCh38", "mm10"):
            group = f.create_group(genome)
            group["data"], group["indices"], group["indptr"] = csc.data, csc.indices, csc.indptr
            group["shape"] = np.array(csc.shape)
            group["barcodes"] = np.array(cells.obs_names, dtype="S")
            group["genes"] = group["gene_names"] = np.array(cells.var_names, dtype="S")
    assert cli_exit_code(["embed", tmp_path / "barnyard.h5", "-m", tiny_bundle[0], "-o", tmp_path / "e.h5ad",
                          "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "2 genomes (GRCh38, mm10)" in err and "genome='GRCh38'" in err and "Traceback" not in err
    assert not (tmp_path / "e.h5ad").exists()
