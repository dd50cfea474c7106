"""Gene medians: TSV round trip, streaming histograms within the documented bound, merging."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from _tokenize_helpers import make_adata

from mixgeneformer.errors import ArtifactError
from mixgeneformer.medians import (
    GeneMedians,
    MedianAccumulator,
    compute_file_medians,
    compute_medians,
)


def exact_medians(counts: sp.csr_matrix, ids: np.ndarray) -> dict[str, float]:
    totals = np.asarray(counts.sum(axis=1), dtype=float).ravel()
    norm = sp.csc_matrix(sp.diags(1e4 / totals) @ counts.astype(float))
    out = {}
    for j, gene in enumerate(ids):
        values = norm.data[norm.indptr[j] : norm.indptr[j + 1]]
        values = values[values > 0]
        if len(values):
            out[gene] = float(np.median(values))
    return out


def test_gene_medians_tsv_round_trip_and_lookup(tmp_path):
    medians = GeneMedians({"ENSG2": 1.5, "ENSG1": 0.1 + 0.2})
    loaded = GeneMedians.load(medians.save(tmp_path / "m.tsv"))
    assert loaded == medians and loaded.hash == medians.hash
    np.testing.assert_array_equal(loaded.lookup(np.array(["ENSG1", "X", "ENSG2"])), [0.1 + 0.2, np.nan, 1.5])
    (tmp_path / "bad.tsv").write_text("gene\tvalue\nA\t1\n")
    with pytest.raises(ArtifactError, match="header"):
        GeneMedians.load(tmp_path / "bad.tsv")
    with pytest.raises(ArtifactError, match="not found"):
        GeneMedians.load(tmp_path / "missing.tsv")


@pytest.mark.realdata
def test_streamed_medians_within_bound_on_baron(baron_data):
    import anndata as ad

    adata = ad.read_h5ad(baron_data / "baron_pancreas_human.h5ad")
    counts = sp.csr_matrix(adata.X)
    ids = np.asarray(adata.var_names, dtype=object)
    totals = np.asarray(counts.sum(axis=1), dtype=float).ravel()
    acc = MedianAccumulator()
    for lo in range(0, counts.shape[0], 500):  # streamed in chunks
        acc.update(counts[lo : lo + 500], ids, totals[lo : lo + 500])
    estimate = acc.finalize()
    exact = exact_medians(counts, ids)
    assert set(estimate.values) == set(exact)
    rel = np.array([abs(estimate.values[g] - m) / m for g, m in exact.items()])
    assert rel.max() <= acc.relative_error_bound
    assert np.median(rel) < acc.relative_error_bound / 4  # interpolation does better than the bound


def test_merge_equals_single_pass_and_npz_round_trip(tmp_path):
    adata = make_adata(60, 50)
    counts, ids = adata.X, np.asarray(adata.var_names, dtype=object)
    totals = np.asarray(counts.sum(axis=1), dtype=float).ravel()
    whole = MedianAccumulator()
    whole.update(counts, ids, totals)
    first, second = MedianAccumulator(), MedianAccumulator()
    first.update(counts[:25], ids, totals[:25])
    perm = np.random.default_rng(0).permutation(len(ids))  # other column order in the second part
    second.update(counts[25:][:, perm], ids[perm], totals[25:])
    first.merge(MedianAccumulator.load(second.save(tmp_path / "acc.npz")))
    assert first.finalize() == whole.finalize()
    assert first.n_cells == 60


def test_duplicate_genes_are_summed_and_restriction_bounds_memory():
    counts = sp.csr_matrix(np.array([[1, 1, 2], [3, 0, 1]]))
    ids = np.array(["ENSG_A", "ENSG_A", "ENSG_B"], dtype=object)
    acc = MedianAccumulator(genes=["ENSG_A"])
    acc.update(counts, ids, np.array([4.0, 4.0]))
    got = acc.finalize().values["ENSG_A"]  # cell values 2/4*1e4 and 3/4*1e4 -> median 6250
    assert abs(got - 6250) / 6250 <= acc.relative_error_bound
    assert len(acc) == 1 and acc.histograms.shape[0] == 1


def test_compute_medians_files_workers_and_per_file(tmp_path):
    a, b = make_adata(30, 40, seed=1), make_adata(20, 40, seed=2)
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    one = compute_medians([tmp_path / "a.h5ad", b], chunk_size=7)
    two = compute_medians([str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")], workers=2, chunk_size=7)
    assert one == two
    per_file = compute_file_medians([a, b])
    assert per_file[0] == compute_medians(a) and per_file[1] == compute_medians(b)
