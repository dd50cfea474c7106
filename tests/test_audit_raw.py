"""Audit: the scanpy user's file. Raw counts kept in ``.raw`` (``adata.raw = adata`` before
normalize_total / log1p, X then restricted to fewer genes) are read with ``layer="raw"`` from an
AnnData, a backed one or an ``.h5ad`` streamed in chunks, with the genes of ``raw.var``; a normalized
X says where the counts are and the option that reads them; an unusable obs ``n_counts`` names the
column, the cell and the fix."""

from __future__ import annotations

import dataclasses
import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from _tokenize_helpers import (
    cli_exit_code,
    make_adata,
    make_medians,
    make_vocab,
    random_gene_bundle,
)

from mixgeneformer.corpus import load_corpus
from mixgeneformer.embed import embed_anndata
from mixgeneformer.errors import InputDataError
from mixgeneformer.medians import compute_medians
from mixgeneformer.readers import normalization_totals, open_source
from mixgeneformer.sharding import cell_lengths, read_rows
from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata, tokenize_files

CONFIG = TokenizeConfig(chunk_size=7, min_coverage=0.0)
RAW_HINT = r"\.raw \(adata\.raw\.X, 60 genes\) holds integer counts.*layer='raw'.*`--layer raw`.*`layer: raw`"



def _log_normalized(matrix: sp.csr_matrix) -> sp.csr_matrix:
    x = sp.csr_matrix(matrix, dtype=np.float32)
    totals = np.asarray(x.sum(axis=1)).ravel()
    x = sp.csr_matrix(sp.diags(1e4 / np.maximum(totals, 1)) @ x)
    x.data = np.log1p(x.data)
    return x


def _scanpy_like(counts: ad.AnnData, kind: str = "csr", keep: int = 40) -> ad.AnnData:
    """``counts`` as scanpy leaves it: ``.raw`` = the counts of every gene (stored as ``kind``), X the
    log-normalized values of the first ``keep`` genes (the highly variable ones)."""
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": lambda m: np.asarray(m.todense())}[kind](counts.X)
    adata = counts[:, :keep].copy()
    adata.raw = ad.AnnData(matrix, obs=counts.obs, var=counts.var)
    adata.X = _log_normalized(adata.X)
    return adata


def _counts(n_cells: int = 24, n_genes: int = 60) -> ad.AnnData:
    counts = make_adata(n_cells, n_genes)
    counts.var["symbol"] = [f"G{i}" for i in range(n_genes)]
    return counts


def _all_counts(source) -> np.ndarray:
    return sp.vstack([chunk.counts for chunk in source.iter_chunks(7)]).toarray()


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_layer_raw_reads_adata_raw_with_its_genes_from_memory_a_backed_object_and_an_h5ad(tmp_path, kind):
    counts = _counts()
    _scanpy_like(counts, kind).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    inputs = {"h5ad": tmp_path / "cells.h5ad", "memory": ad.read_h5ad(tmp_path / "cells.h5ad"), "backed": backed}
    for name, item in inputs.items():
        with open_source(item, layer="raw") as source:
            assert (source.n_cells, source.n_genes) == (24, 60), name  # raw's 60 genes, not X's 40
            assert list(source.gene_ids) == list(counts.var_names), name
            if name != "memory":  # streamed from raw/X on disk, never loaded whole
                assert type(source).__name__ in ("_H5adSource", "_BackedSource")
            np.testing.assert_array_equal(_all_counts(source), counts.X.toarray())
        with open_source(item, layer="raw", gene_column="symbol") as source:  # gene_column looked up in raw.var
            assert list(source.gene_ids) == list(counts.var["symbol"]), name
    with open_source(backed[[5, 3, 9]], layer="raw") as source:  # a view of a backed object: its cells
        np.testing.assert_array_equal(_all_counts(source), counts.X[[5, 3, 9]].toarray())
    backed.file.close()


def test_a_normalized_x_names_the_counts_in_raw_and_the_option_that_reads_them(tmp_path):
    _scanpy_like(_counts()).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    for item in (tmp_path / "cells.h5ad", ad.read_h5ad(tmp_path / "cells.h5ad"), backed):
        with pytest.raises(InputDataError, match=r"non-integer values.*normalized or log-transformed: its " + RAW_HINT):
            with open_source(item) as source:
                list(source.iter_chunks(10))
    backed.file.close()


def test_medians_and_tokenize_read_raw_with_layer_raw_as_from_the_counts(tmp_path, capsys):
    counts = _counts()
    _scanpy_like(counts).write_h5ad(tmp_path / "cells.h5ad")
    genes = np.asarray(counts.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    vocab.save(tmp_path / "vocab.json")
    medians.save(tmp_path / "medians.tsv")
    cells = str(tmp_path / "cells.h5ad")

    assert cli_exit_code(["medians", cells, "-o", str(tmp_path / "m.tsv")]) == 2  # refused: X is log-normalized ...
    assert "`--layer raw`" in capsys.readouterr().err  # ... with the option that reads the counts
    assert cli_exit_code(["medians", cells, "-o", str(tmp_path / "m.tsv"), "--layer", "raw", "--min-coverage", "0"]) == 0
    from mixgeneformer.medians import GeneMedians

    assert GeneMedians.load(tmp_path / "m.tsv").hash == compute_medians([counts], min_coverage=0.0).hash

    expected = tokenize_anndata(counts, vocab, medians, CONFIG)["input_ids"]
    raw_config = dataclasses.replace(CONFIG, layer="raw")
    assert tokenize_anndata(ad.read_h5ad(cells), vocab, medians, raw_config)["input_ids"] == expected
    tokenize_files([cells], tmp_path / "corpus", vocab, medians, raw_config)
    assert load_corpus(tmp_path / "corpus")["input_ids"] == expected
    args = ["tokenize", cells, "--vocab", str(tmp_path / "vocab.json"), "--medians", str(tmp_path / "medians.tsv"),
            "--min-coverage", "0", "--chunk-size", "7", "--layer", "raw", "-o", str(tmp_path / "cli")]
    assert cli_exit_code(args) == 0
    assert load_corpus(tmp_path / "cli")["input_ids"] == expected


def test_embed_reads_raw_through_the_tokenize_config_yaml_and_the_sharded_paths_keep_it(tmp_path, capsys):
    bundle = random_gene_bundle(tmp_path / "bundle", 50, 10)
    counts = ad.AnnData(sp.csr_matrix(bundle.rng.poisson(1.0, (12, 60)).astype(np.int32)),
                        var=ad.AnnData(np.zeros((1, 60))).var.set_axis(bundle.ids))
    _scanpy_like(counts).write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "raw.yaml").write_text("layer: raw\n")
    args = ["embed", str(tmp_path / "cells.h5ad"), "-m", str(bundle.folder), "--device", "cpu", "--no-progress"]
    assert cli_exit_code([*args, "-o", str(tmp_path / "x.h5ad")]) == 2
    assert "`layer: raw`" in capsys.readouterr().err
    assert cli_exit_code([*args, "-o", str(tmp_path / "e.h5ad"), "--tokenize-config", str(tmp_path / "raw.yaml")]) == 0
    embed_anndata(counts, bundle.folder, device="cpu", progress=False)
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_mixgeneformer"], counts.obsm["X_mixgeneformer"], rtol=1e-5, atol=1e-6
    )
    # multi-process embed / predict: the shard plan reads raw/X, each shard's cells keep their .raw
    lengths = cell_lengths(tmp_path / "cells.h5ad", TokenizeConfig(layer="raw"))
    np.testing.assert_array_equal(lengths, np.diff(counts.X.indptr))
    part = read_rows(tmp_path / "cells.h5ad", 4, 9)
    with open_source(part, layer="raw") as source:
        np.testing.assert_array_equal(_all_counts(source), counts.X[4:9].toarray())


def test_a_layer_named_raw_is_read_as_before_and_the_shadowed_raw_is_named(tmp_path, caplog):
    counts = _counts()
    adata = _scanpy_like(counts)
    adata.layers["raw"] = sp.csr_matrix(counts.X[:, :40] * 2)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    for item in (adata, tmp_path / "cells.h5ad"):
        with caplog.at_level(logging.WARNING), open_source(item, layer="raw") as source:
            assert source.n_genes == 40
            np.testing.assert_array_equal(_all_counts(source), counts.X[:, :40].toarray() * 2)
        assert "its .raw" in caplog.text and "is not read" in caplog.text
        caplog.clear()


def test_missing_layers_say_whether_there_is_a_raw(tmp_path):
    plain = make_adata(10, 20)
    plain.write_h5ad(tmp_path / "plain.h5ad")
    for item in (plain, tmp_path / "plain.h5ad"):
        with pytest.raises(InputDataError, match=r"layer 'raw' not found.*layer='raw' reads \.raw \(adata\.raw\.X\), and it has none"):
            open_source(item, layer="raw")
    adata = _scanpy_like(_counts())
    adata.write_h5ad(tmp_path / "cells.h5ad")
    for item in (adata, tmp_path / "cells.h5ad"):
        with pytest.raises(InputDataError, match=r"layer 'counts' not found.*layer='raw' reads its \.raw, 60 genes"):
            open_source(item, layer="counts")


def test_a_raw_set_after_log1p_is_not_offered_and_reading_it_says_why_it_fails(tmp_path):
    adata = _scanpy_like(_counts())
    adata.raw = adata  # the pbmc3k tutorial's order: .raw then holds the log-normalized values
    adata.write_h5ad(tmp_path / "cells.h5ad")
    for item in (adata, tmp_path / "cells.h5ad"):
        with pytest.raises(InputDataError) as refused:
            with open_source(item) as source:
                list(source.iter_chunks(10))
        assert "layer='raw'" not in str(refused.value) and "layer='counts'" in str(refused.value)
        with pytest.raises(InputDataError, match=r"non-integer.*That matrix is the input's \.raw.*read for layer='raw'"):
            with open_source(item, layer="raw") as source:
                list(source.iter_chunks(10))


def test_an_unusable_n_counts_names_the_column_the_cell_and_the_fix(tmp_path, capsys):
    adata = make_adata(20, 40)
    sums = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
    adata.obs["n_counts"] = sums
    adata.obs.loc["cell13", "n_counts"] = np.nan  # e.g. concatenated with a file that had no n_counts
    with open_source(adata) as source:
        chunk = next(source.iter_chunks(100, obs_columns=["n_counts"]))
    fix = r"del adata\.obs\['n_counts'\]"
    with pytest.raises(InputDataError, match=r"obs column 'n_counts'.*for 1 of cells 0–19 \(first: cell 13 \(cell13\) = nan\).*" + fix):
        normalization_totals(chunk)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    assert cli_exit_code(["medians", str(tmp_path / "cells.h5ad"), "-o", str(tmp_path / "m.tsv")]) == 2
    err = capsys.readouterr().err
    assert "'n_counts'" in err and "cell13" in err and "del adata.obs['n_counts']" in err
    del adata.obs["n_counts"]  # the fix: every total is then the row sum
    with open_source(adata) as source:
        np.testing.assert_array_equal(normalization_totals(next(source.iter_chunks(100))), sums)
