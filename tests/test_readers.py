"""Readers: every input format yields the same counts, gene IDs and obs; bad counts are refused."""

from __future__ import annotations

import gzip

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from _tokenize_helpers import make_adata

from mixgeneformer.errors import InputDataError
from mixgeneformer.readers import open_source, remap_columns, validate_counts


def write_loom(adata, path):
    with h5py.File(path, "w") as f:
        f["matrix"] = adata.X.toarray().T
        f.create_group("layers")
        f["row_attrs/Accession"] = np.array(adata.var_names, dtype="S")
        f["col_attrs/CellID"] = np.array(adata.obs_names, dtype="S")
        f["col_attrs/cell_type"] = np.array(adata.obs["cell_type"].astype(str), dtype="S")


def write_10x_h5(adata, path):
    csc = sp.csc_matrix(adata.X.T)  # genes x cells
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array(csc.shape)
        g["barcodes"] = np.array(adata.obs_names, dtype="S")
        g["features/id"] = np.array(adata.var_names, dtype="S")
        g["features/name"] = np.array([f"G{i}" for i in range(adata.n_vars)], dtype="S")
        g["features/feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")


def write_mtx(adata, folder):
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(adata.X.T), field="integer")
    pd.DataFrame({"id": adata.var_names, "name": "x", "type": "Gene Expression"}).to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(folder / "barcodes.tsv.gz", sep="\t", header=False, index=False)


def all_formats(adata, tmp_path):
    """The same data in every supported format (path or object)."""
    import anndata as ad

    out = {"memory_csr": adata, "memory_dense": ad.AnnData(adata.X.toarray(), adata.obs, adata.var),
           "memory_csc": ad.AnnData(sp.csc_matrix(adata.X), adata.obs, adata.var),
           "memory_float": ad.AnnData(adata.X.astype(np.float64), adata.obs, adata.var)}
    adata.write_h5ad(tmp_path / "csr.h5ad")
    out["h5ad_csr"] = tmp_path / "csr.h5ad"
    out["h5ad_csc"] = tmp_path / "csc.h5ad"
    ad.AnnData(sp.csc_matrix(adata.X), adata.obs, adata.var).write_h5ad(out["h5ad_csc"])
    out["h5ad_dense"] = tmp_path / "dense.h5ad"
    ad.AnnData(adata.X.toarray().astype(np.float32), adata.obs, adata.var).write_h5ad(out["h5ad_dense"], compression="gzip")
    out["h5ad_backed"] = ad.read_h5ad(tmp_path / "csr.h5ad", backed="r")
    write_loom(adata, tmp_path / "x.loom")
    out["loom"] = tmp_path / "x.loom"
    write_10x_h5(adata, tmp_path / "x.h5")
    out["tenx_h5"] = tmp_path / "x.h5"
    write_mtx(adata, tmp_path / "mtx")
    out["tenx_mtx"] = tmp_path / "mtx"
    import tiledbsoma.io

    out["soma"] = tiledbsoma.io.from_h5ad(str(tmp_path / "soma"), str(tmp_path / "csr.h5ad"), measurement_name="RNA")
    return out


def read_all(item, chunk_size=7):
    with open_source(item) as source:
        chunks = list(source.iter_chunks(chunk_size))
        return sp.vstack([c.counts for c in chunks]).toarray(), source.gene_ids, np.concatenate([c.obs.index for c in chunks]), [c.start for c in chunks]


def test_every_format_reads_the_same_counts(tmp_path):
    adata = make_adata(23, 30)
    expected = adata.X.toarray()
    for name, item in all_formats(adata, tmp_path).items():
        counts, genes, cells, starts = read_all(item)
        np.testing.assert_array_equal(counts, expected, err_msg=name)
        assert list(genes) == list(adata.var_names), name
        assert list(cells) == list(adata.obs_names), name
        assert starts == [0, 7, 14, 21], name


def test_obs_columns_and_missing_column_error(tmp_path):
    adata = make_adata(10, 20)
    with open_source(adata) as source:
        chunk = next(source.iter_chunks(4, obs_columns=["cell_type"]))
        assert list(chunk.obs["cell_type"]) == ["a", "b", "c", "a"]
        with pytest.raises(InputDataError, match="Available obs columns"):
            next(source.iter_chunks(4, obs_columns=["nope"]))


def test_layers_and_gene_column(tmp_path):
    adata = make_adata(10, 20)
    adata.layers["counts"] = adata.X.copy()
    adata.var["symbol"] = [f"S{i}" for i in range(20)]
    adata.X = adata.X.astype(np.float32) * 0.5
    adata.write_h5ad(tmp_path / "a.h5ad")
    for item in (adata, tmp_path / "a.h5ad"):
        with open_source(item, layer="counts", gene_column="symbol") as source:
            assert source.gene_ids[3] == "S3"
            assert next(source.iter_chunks(10)).counts.toarray().sum() == adata.layers["counts"].sum()
        with pytest.raises(InputDataError, match=r"layer 'raw' not found. Available layers: \['counts'\]"):
            open_source(item, layer="raw")
        with pytest.raises(InputDataError, match="gene_column 'bad' not found"):
            open_source(item, gene_column="bad")
        with open_source(item) as source, pytest.raises(InputDataError, match="expects raw integer counts.*found 0.5 at cell"):
            list(source.iter_chunks(10))
        with open_source(item, allow_fractional=True) as source:
            assert len(list(source.iter_chunks(10))) == 1


@pytest.mark.parametrize(
    ("value", "pattern"),
    [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-2.0, "1 negative values .*first: -2.0 at cell 5 \\(c5\\), gene column 3 \\(g3\\)"), (0.693, "found 0.693 at cell 5 \\(c5\\), gene column 3 \\(g3\\)")],
)
def test_validation_names_value_cell_and_gene(value, pattern):
    dense = np.ones((8, 5))
    dense[5, 3] = value
    with pytest.raises(InputDataError, match=pattern):
        validate_counts(sp.csr_matrix(dense), cell_names=[f"c{i}" for i in range(8)], gene_ids=np.array([f"g{i}" for i in range(5)]))


def test_input_is_not_mutated(tmp_path):
    adata = make_adata(12, 20)
    before = adata.X.copy()
    adata.X = sp.csc_matrix(adata.X)
    with open_source(adata) as source:
        list(source.iter_chunks(5))
    assert sp.isspmatrix_csc(adata.X) and (adata.X != before).nnz == 0


def test_unsupported_inputs(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputDataError, match="unsupported file type"):
        open_source(tmp_path / "x.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputDataError, match="neither a 10x mtx folder"):
        open_source(tmp_path / "empty_dir")


def test_remap_columns_sums_duplicates():
    m = sp.csr_matrix(np.array([[1, 2, 0, 3], [0, 0, 5, 1]]))
    np.testing.assert_array_equal(remap_columns(m, np.array([0, -1, 1, 0]), 2).toarray(), [[4, 0], [1, 5]])
    # Summed in a wide type: two uint8 columns of 200 are 400, not 144.
    small = sp.csr_matrix(np.array([[200, 200, 7]], dtype=np.uint8))
    np.testing.assert_array_equal(remap_columns(small, np.array([0, 0, 1]), 2).toarray(), [[400, 7]])


def test_obs_is_read_per_chunk_with_types_kept(tmp_path):
    adata = make_adata(n_cells=23, seed=3)
    adata.obs["cell_type"] = pd.Categorical(adata.obs["cell_type"].astype(str))
    adata.obs["score"] = np.arange(adata.n_obs, dtype=np.float64)
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    with open_source(path) as source:
        chunks = list(source.iter_chunks(chunk_size=5, obs_columns=["cell_type", "score"]))
        empty = source.obs(["cell_type", "score"], 0, 0)
    obs = pd.concat([c.obs for c in chunks])
    assert list(obs.index) == list(adata.obs_names)
    assert list(obs["cell_type"].astype(str)) == list(adata.obs["cell_type"].astype(str))
    assert np.array_equal(obs["score"].to_numpy(), adata.obs["score"].to_numpy())
    assert len(empty) == 0 and empty["score"].dtype == np.float64
