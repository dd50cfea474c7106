"""Audit: inputs read as they are meant. A view of a backed AnnData is read as the view (its cells and
genes, in its order); a CSR storing a gene twice in a cell reads as the summed count; totals='kept'
medians divide by the same vocabulary-gene totals the tokenizer uses."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from _tokenize_helpers import make_adata, make_medians, make_vocab, random_gene_bundle

from mixgeneformer.embed import embed_anndata
from mixgeneformer.errors import ConfigError
from mixgeneformer.medians import MedianAccumulator, compute_medians
from mixgeneformer.readers import ReadOptions, normalization_totals, open_source
from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata

CONFIG = TokenizeConfig(chunk_size=7, min_coverage=0.0)


@pytest.fixture
def backed(tmp_path):
    adata = make_adata(40, 60)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    genes = np.asarray(adata.var_names)
    handle = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    yield adata, handle, make_vocab(genes), make_medians(genes)
    handle.file.close()


@pytest.mark.parametrize(
    "select",
    [(slice(5, 15),), (slice(None), slice(10, 40)), ([5, 3, 30],), (np.arange(40) % 3 == 0, slice(0, 50))],
    ids=["rows", "genes", "unsorted-rows", "mask-and-genes"],
)
def test_a_backed_view_is_tokenized_as_the_view(backed, select):
    adata, handle, vocab, medians = backed
    view = handle[select]
    assert view.is_view and view.isbacked
    expected = tokenize_anndata(adata[select].copy(), vocab, medians, CONFIG)
    got = tokenize_anndata(view, vocab, medians, CONFIG)
    assert len(got) == adata[select].n_obs
    assert got["input_ids"] == expected["input_ids"]
    assert got["cell_index"] == expected["cell_index"]


def test_a_backed_file_streams_with_obs_and_var_as_changed_in_memory(backed):
    adata, handle, vocab, medians = backed
    handle.var["symbol"] = [f"S{i}" for i in range(handle.n_vars)]
    handle.obs["label"] = np.arange(handle.n_obs) * 2
    with open_source(handle, gene_column="symbol") as source:
        assert type(source).__name__ == "_BackedSource"  # X is still read from the file in chunks
        chunks = list(source.iter_chunks(7, obs_columns=["label"]))
        assert source.gene_ids[3] == "S3"
    np.testing.assert_array_equal(sp.vstack([c.counts for c in chunks]).toarray(), adata.X.toarray())
    np.testing.assert_array_equal(np.concatenate([c.obs["label"].to_numpy() for c in chunks]), np.arange(40) * 2)
    assert tokenize_anndata(handle, vocab, medians, CONFIG)["input_ids"] == tokenize_anndata(adata, vocab, medians, CONFIG)["input_ids"]


def test_embed_refuses_what_anndata_cannot_write_before_any_work(backed, tmp_path):
    _, handle, _, _ = backed
    missing_bundle = tmp_path / "no_such_bundle"  # loading it would fail later, with another error
    with pytest.raises(ConfigError, match=r"copy=True.*copy=False.*to_memory"):
        embed_anndata(handle, missing_bundle, copy=True)
    with pytest.raises(ConfigError, match=r"view of the backed file.*to_memory"):
        embed_anndata(handle[[5, 3, 30]], missing_bundle)


def test_embedding_a_backed_file_equals_embedding_it_in_memory(tmp_path):
    bundle = random_gene_bundle(tmp_path / "bundle", 50, 10)
    counts = sp.csr_matrix(bundle.rng.poisson(1.0, (12, 60)).astype(np.int32))
    adata = ad.AnnData(counts, var=ad.AnnData(np.zeros((1, 60))).var.set_axis(bundle.ids))
    adata.write_h5ad(tmp_path / "cells.h5ad")
    handle = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    options = {"device": "cpu", "progress": False}
    embed_anndata(adata, bundle.folder, **options)
    embed_anndata(handle, bundle.folder, **options)
    np.testing.assert_allclose(handle.obsm["X_mixgeneformer"], adata.obsm["X_mixgeneformer"], rtol=1e-5, atol=1e-6)
    view = handle[[5, 3, 9]].to_memory()  # the refused view, read as the message says
    embed_anndata(view, bundle.folder, key="X_view", **options)
    np.testing.assert_allclose(view.obsm["X_view"], adata.obsm["X_mixgeneformer"][[5, 3, 9]], rtol=1e-5, atol=1e-6)
    handle.file.close()


def _split_entries(counts: sp.csr_matrix) -> sp.csr_matrix:
    """The same counts with every stored value split into two entries of one (cell, gene), the
    halves stored apart and in reverse column order."""
    counts = sp.csr_matrix(counts)
    first = counts.data // 2
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    rows2 = np.concatenate([rows, rows])
    cols2 = np.concatenate([counts.indices, counts.indices])
    data2 = np.concatenate([first, counts.data - first])
    order = np.lexsort((-cols2, rows2))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows2, minlength=counts.shape[0]))])
    split = sp.csr_matrix((data2[order], cols2[order], indptr), shape=counts.shape)
    assert split.nnz == 2 * counts.nnz and not split.has_canonical_format
    return split


def _doubled_adata():
    adata = make_adata(30, 60)
    adata.X = adata.X * 2  # every count ≥ 2: both halves are positive
    return adata


def test_a_gene_stored_twice_in_a_cell_is_one_summed_count(tmp_path):
    adata = _doubled_adata()
    genes = np.asarray(adata.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    split = ad.AnnData(_split_entries(adata.X), adata.obs, adata.var)
    expected_tokens = tokenize_anndata(adata, vocab, medians, CONFIG)["input_ids"]
    assert tokenize_anndata(split, vocab, medians, CONFIG)["input_ids"] == expected_tokens
    assert compute_medians(split, chunk_size=7) == compute_medians(adata, chunk_size=7)
    # on disk: the h5ad's CSR arrays hold the split entries
    split.write_h5ad(tmp_path / "split.h5ad")
    with h5py.File(tmp_path / "split.h5ad", "r+") as f:
        del f["X/data"], f["X/indices"], f["X/indptr"]
        f["X/data"], f["X/indices"], f["X/indptr"] = split.X.data, split.X.indices, split.X.indptr
    with open_source(tmp_path / "split.h5ad") as source:
        np.testing.assert_array_equal(sp.vstack([c.counts for c in source.iter_chunks(7)]).toarray(), adata.X.toarray())
    assert compute_medians(tmp_path / "split.h5ad", chunk_size=7) == compute_medians(adata, chunk_size=7)
    # the accumulator, used directly
    whole, parts = MedianAccumulator(), MedianAccumulator()
    totals = np.asarray(adata.X.sum(axis=1), dtype=float).ravel()
    whole.update(adata.X, genes, totals)
    parts.update(split.X, genes, totals)
    assert parts.finalize() == whole.finalize()


def test_kept_totals_medians_use_the_vocabulary_genes_the_tokenizer_uses():
    adata = make_adata(40, 60)
    genes = np.asarray(adata.var_names)
    vocab = make_vocab(genes)  # every 7th gene is outside the vocabulary
    got = compute_medians(adata, totals="kept", vocabulary_ids=vocab.gene_to_id)
    # by hand: count / (sum over vocabulary genes) × 10,000, median over the nonzero values per gene
    dense = adata.X.toarray().astype(float)
    in_vocab = np.array([g in vocab.gene_to_id for g in genes])
    with open_source(adata) as source:  # the tokenizer's totals for the same gene set
        tokenizer_totals = normalization_totals(next(source.iter_chunks(40)), "kept", in_vocab)
    np.testing.assert_array_equal(tokenizer_totals, dense[:, in_vocab].sum(axis=1))
    norm = dense / tokenizer_totals[:, None] * 1e4
    for j in np.flatnonzero(in_vocab & (dense > 0).any(axis=0))[:10]:
        true = np.median(norm[dense[:, j] > 0, j])
        assert got.values[genes[j]] == pytest.approx(true, rel=0.012)
    # the CLI's --vocab (genes=) keeps the same set
    tracked = compute_medians(adata, totals="kept", genes=sorted(vocab.gene_to_id))
    assert tracked.values == {g: m for g, m in got.values.items() if g in vocab.gene_to_id}


def test_kept_totals_without_a_vocabulary_are_refused(tmp_path, capsys):
    from mixgeneformer.cli import main

    adata = make_adata(10, 20)
    with pytest.raises(ConfigError, match=r"totals='kept'.*vocabulary.*--vocab"):
        compute_medians(adata, totals="kept")
    with pytest.raises(ConfigError, match=r"totals='kept'"):
        compute_medians(adata, read=ReadOptions(totals="kept"))
    adata.write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(SystemExit) as exit_info:
        main(["medians", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "m.tsv"), "--totals", "kept"])
    assert exit_info.value.code == 2
    assert "--vocab" in capsys.readouterr().err
    assert not (tmp_path / "m.tsv").exists()
