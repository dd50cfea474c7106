"""10x ``matrix.mtx`` folders at scale, and looms of Ensembl IDs under the var index's name.

1. Reading a 10x mtx folder parsed the whole file into one int64 table, then a COO, then a CSR: several
   times the matrix at once; and every rank of a sharded run (``mixgf embed/predict/perturb --shard-index``)
   held the WHOLE matrix to keep its cell range. Now the file is parsed in chunks of entries into int32
   indices, and a read of a cell range (``read_anndata(rows=...)``, ``open_source(cells=...)``) keeps only
   those cells' entries. The results are checked against scipy.io.mmread on real Baron cells, across chunk
   boundaries (chunks down to one entry), for the full read and every kind of range.
2. A ``.loom`` written by anndata from an AnnData whose var index has a name (``gene_id``) stores the
   gene IDs under that name; it needed ``--gene-column``. The one attribute of Ensembl IDs is read now.
"""

from __future__ import annotations

import gzip
import logging
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

import mixgeneformer.readers.mtx as mtx
from mixgeneformer.errors import InputDataError
from mixgeneformer.genes import gene_table
from mixgeneformer.readers import open_source, read_anndata
from mixgeneformer.readers.cells import read_cells


@pytest.fixture(scope="module")
def baron(baron_data):
    """72 real Baron human cells (raw counts), every gene."""
    cells = ad.read_h5ad(baron_data / "baron_pancreas_human.h5ad")
    return cells[np.arange(0, 1440, 20)].copy()


def write_folder(cells, folder, gz=True, order="cells", types=None, field="integer"):
    """``cells`` as a 10x folder (matrix.mtx genes × barcodes, features.tsv, barcodes.tsv). ``order``: the
    entries sorted by cell then gene (as CellRanger writes them), ``shuffled``, or ``duplicated`` (shuffled,
    and each count of the first cells split over two entries), ``duplicated_sorted`` (those, sorted)."""
    folder.mkdir()
    coo = sp.coo_matrix(sp.csc_matrix(cells.X.T))  # genes x cells, sorted by cell then gene
    rows, cols, values = coo.row, coo.col, coo.data.astype(np.int64)
    if order != "cells":
        if order.startswith("duplicated"):
            first = np.flatnonzero((cols < 3) & (values > 1))
            rows, cols = np.concatenate([rows, rows[first]]), np.concatenate([cols, cols[first]])
            values = np.concatenate([values, values[first] // 2])
            values[first] -= values[first] // 2
        shuffle = np.random.default_rng(0).permutation(len(rows))
        if order == "duplicated_sorted":
            shuffle = np.lexsort((rows, cols))
        rows, cols, values = rows[shuffle], cols[shuffle], values[shuffle]
    open_ = (lambda p: gzip.open(str(p) + ".gz", "wt")) if gz else (lambda p: open(p, "w"))
    with open_(folder / "matrix.mtx") as handle:
        handle.write(f"%%MatrixMarket matrix coordinate {field} general\n%metadata_json: {{}}\n")
        handle.write(f"{cells.n_vars} {cells.n_obs} {len(values)}\n")
        fmt = "%d" if field == "integer" else "%.1f"
        for r, c, v in zip(rows + 1, cols + 1, values, strict=True):
            handle.write(f"{r} {c} {fmt % v}\n")
    features = pd.DataFrame({"id": [f"ENSG{i:011d}" for i in range(cells.n_vars)], "name": cells.var_names,
                             "type": types if types is not None else "Gene Expression"})
    with open_(folder / "features.tsv") as handle:
        features.to_csv(handle, sep="\t", header=False, index=False)
    with open_(folder / "barcodes.tsv") as handle:
        pd.Series(cells.obs_names).to_csv(handle, sep="\t", header=False, index=False)
    return folder


def reference(folder):
    """cells × genes CSR, barcodes and feature ids by scipy.io.mmread (duplicates summed, as before)."""
    matrix = next(folder.glob("matrix.mtx*"))
    csr = sp.csr_matrix(scipy.io.mmread(str(matrix)).T)
    csr.sum_duplicates()
    read = pd.read_csv(next(folder.glob("barcodes.tsv*")), sep="\t", header=None, dtype=str).iloc[:, 0].to_numpy()
    feat = pd.read_csv(next(folder.glob("features.tsv*")), sep="\t", header=None, dtype=str)
    return csr, read, feat


def assert_same(got, csr, barcodes, genes, rows):
    lo, hi = rows
    want = csr[lo:hi]
    assert got.X.dtype == (want.dtype if hi > lo else np.float32)  # no cell: read_anndata's empty matrix, as before
    assert got.shape == want.shape
    got_x = sp.csr_matrix(got.X)
    assert got_x.has_canonical_format
    np.testing.assert_array_equal(got_x.indptr, want.indptr)
    np.testing.assert_array_equal(got_x.indices, want.indices)
    np.testing.assert_array_equal(got_x.data, want.data)
    assert list(got.obs_names) == list(barcodes[lo:hi])
    assert list(got.var_names) == list(genes)


def ranges(n):
    """Every cell; empty ranges; the first and last cell; ranges not aligned to chunks; ranges past either end."""
    return [None, (0, 0), (0, 1), (n - 1, n), (n // 5, n // 2 + 1), (5, 6), (n - 5, n + 100), (-3, 4), (n + 2, n + 9),
            (n // 2, n // 4)]


def clip(rows, n):
    if rows is None:
        return 0, n
    lo = max(0, rows[0])
    return lo, max(lo, min(rows[1], n))


@pytest.mark.parametrize("order", ["cells", "shuffled", "duplicated", "duplicated_sorted"])
@pytest.mark.parametrize("chunk", [977, 1])
def test_mtx_reads_match_mmread_for_every_range(tmp_path, monkeypatch, baron, order, chunk):
    cells = baron if chunk > 1 else baron[:12, np.flatnonzero(np.asarray(baron[:12].X.sum(axis=0)).ravel() > 150)].copy()
    folder = write_folder(cells, tmp_path / "tenx", gz=chunk > 1, order=order)
    csr, barcodes, feat = reference(folder)
    n = cells.n_obs
    monkeypatch.setattr(mtx, "_MTX_CHUNK", chunk)
    assert csr.nnz > 20 * chunk  # many parse chunks
    with mtx._open_text(next(folder.glob("matrix.mtx*"))) as handle:
        entries = len(handle.readlines()) - 3
    assert entries > csr.nnz if order.startswith("duplicated") else entries == csr.nnz  # entries summed
    for rows in ranges(n):
        got = read_anndata(folder, rows, chunk_size=9)
        lo, hi = clip(rows, n)
        assert_same(got, csr, barcodes, feat[0].to_numpy(), (lo, hi))
    got = read_anndata(folder, chunk_size=10_000)  # one read chunk
    assert got.X.dtype == np.int64 and got.X.nnz == csr.nnz
    shape, held, lo = mtx._read_mtx(next(folder.glob("matrix.mtx*")), (1, 9))  # what the source holds (cells 1, 2: duplicates)
    assert shape == (cells.n_vars, n) and lo == 1 and held.has_canonical_format and held.nnz == csr[1:9].nnz
    assert (held != csr[1:9]).nnz == 0


def test_a_range_read_keeps_only_its_cells(tmp_path, monkeypatch, baron):
    """What a rank of a sharded run holds: its cells' entries only, numbered as in the whole input."""
    folder = write_folder(baron, tmp_path / "tenx")
    csr, barcodes, _ = reference(folder)
    monkeypatch.setattr(mtx, "_MTX_CHUNK", 5_000)
    held = []
    real = mtx._read_mtx
    monkeypatch.setattr(mtx, "_read_mtx", lambda *a: held.append(real(*a)) or held[-1])
    shard = read_cells(folder, None, (18, 36))  # what embed / predict / perturb read for a shard
    assert held[-1][1].shape == (18, baron.n_vars) and held[-1][1].nnz == csr[18:36].nnz < csr.nnz / 3
    assert held[-1][1].indices.dtype == np.int32
    assert list(shard.obs_names) == list(barcodes[18:36])
    with open_source(folder, cells=(18, 36)) as source:
        assert source.n_cells == baron.n_obs  # numbered as the whole input
        chunk = next(source.iter_chunks(5, start=20, stop=36))
        assert chunk.start == 20 and (chunk.counts != csr[20:25]).nnz == 0
        with pytest.raises(RuntimeError, match="only cells 18–36 were read"):
            next(source.iter_chunks(5, start=10, stop=20))
    assert source._matrix is None  # released on close: read_anndata builds its AnnData after closing the source
    read_cells(folder, None)
    assert held[-1][1].shape == (baron.n_obs, baron.n_vars)


def test_feature_types_gene_column_and_real_values_are_kept(tmp_path, monkeypatch, baron):
    types = np.where(np.arange(baron.n_vars) % 7 == 0, "Antibody Capture", "Gene Expression")
    folder = write_folder(baron, tmp_path / "tenx", gz=False, types=types, field="real")
    csr, barcodes, feat = reference(folder)
    keep = np.flatnonzero(types == "Gene Expression")
    monkeypatch.setattr(mtx, "_MTX_CHUNK", 3_001)
    for rows in [None, (7, 29)]:
        got = read_anndata(folder, rows, gene_column="name", chunk_size=8)
        lo, hi = clip(rows, baron.n_obs)
        assert_same(got, csr[:, keep], barcodes, feat[1].to_numpy()[keep], (lo, hi))
        assert got.X.dtype == np.float64
        np.testing.assert_array_equal(got.var["name"], baron.var_names[keep])
        assert got.X.sum() == baron.X[lo:hi][:, keep].sum() > 0


def _rewrite(folder, edit):
    path = folder / "matrix.mtx.gz"
    with gzip.open(path, "rt") as handle:
        lines = handle.read().splitlines(keepends=True)
    with gzip.open(path, "wt") as handle:
        handle.writelines(edit(lines))


def test_damaged_files_are_refused_with_their_message(tmp_path, monkeypatch, baron):
    monkeypatch.setattr(mtx, "_MTX_CHUNK", 1_000)
    small = baron[:12].copy()
    folder = write_folder(small, tmp_path / "tenx")
    n_entries = sp.csr_matrix(small.X).nnz
    whole = []
    _rewrite(folder, lambda lines: whole.extend(lines) or lines[:-10])  # the last 10 entries lost
    for rows in [None, (0, 2), (11, 12)]:  # in every range: the entry count is the whole file's
        with pytest.raises(InputDataError, match=f"header announces {n_entries} entries but {n_entries - 10} were read; "
                                                 "the file is truncated"):
            read_anndata(folder, rows)
    _rewrite(folder, lambda lines: lines + [f"5 {small.n_obs + 1} 3\n"] * 10)  # whole again, and one cell too many
    with pytest.raises(InputDataError, match=f"column \\(cell\\) number {small.n_obs + 1}, outside the header's 1–12"):
        read_anndata(folder, (0, 2))  # an entry outside the range asked for is still checked
    _rewrite(folder, lambda lines: lines[:3] + ["0 1 3\n"] + lines[4:-10])
    with pytest.raises(InputDataError, match="entry 1 has row \\(gene\\) number 0"):
        read_anndata(folder)
    first = whole[3].split()  # the first entry's count, negative
    _rewrite(folder, lambda lines: lines[:3] + [f"{first[0]} {first[1]} -{first[2]}\n"] + whole[4:])
    with pytest.raises(InputDataError, match="negative"):  # still validated as counts
        read_anndata(folder, (0, 4))
    assert read_anndata(folder, (1, 4)).X.min() >= 0  # cells without it
    _rewrite(folder, lambda lines: [lines[0].replace("general", "symmetric")] + lines[1:])
    with pytest.raises(InputDataError, match="symmetric"):
        read_anndata(folder, (0, 4))
    _rewrite(folder, lambda lines: [lines[0].replace("symmetric", "general")] + lines[1:3])  # no entries
    with pytest.raises(InputDataError, match=f"header announces {n_entries} entries but 0 were read"):
        read_anndata(folder)


def test_the_mtx_shape_must_match_features_and_barcodes(tmp_path, baron):
    folder = write_folder(baron[:12].copy(), tmp_path / "tenx")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as handle:
        handle.write("".join(f"cell{i}\n" for i in range(11)))
    with pytest.raises(InputDataError, match="but there are 14206 features and 11 barcodes"):
        read_anndata(folder, (0, 3))


def test_an_all_zero_mtx_reads_as_zero_counts(tmp_path):
    folder = tmp_path / "tenx"
    folder.mkdir()
    (folder / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n3 2 0\n")
    (folder / "features.tsv").write_text("".join(f"ENSG0000000000{i}\tA\tGene Expression\n" for i in range(3)))
    (folder / "barcodes.tsv").write_text("c1\nc2\n")
    got = read_anndata(folder)
    assert got.shape == (2, 3) and got.X.nnz == 0  # an EmptyDataError ("failed") before


# 2. a loom of Ensembl IDs under the var index's name -----------------------------------------------------
@pytest.fixture(scope="module")
def ensembl_cells(baron):
    table = gene_table("human").drop_duplicates("symbol").set_index("symbol")["ensembl_id"]
    known = np.flatnonzero(baron.var_names.isin(table.index))
    cells = baron[:30, known].copy()
    ids = table.loc[cells.var_names].to_numpy().astype(object)
    ids[::3] = [f"{i}.{k % 9 + 1}" for k, i in enumerate(ids[::3])]  # versions allowed
    cells.var = pd.DataFrame({"symbol": cells.var_names.to_numpy()}, index=pd.Index(ids, name="gene_id"))
    cells.obs = cells.obs[["cell_type1"]].copy()
    return cells


def test_a_loom_reads_its_one_attribute_of_ensembl_ids(tmp_path, caplog, ensembl_cells):
    path = tmp_path / "cells.loom"
    ensembl_cells.write_loom(path)
    with caplog.at_level(logging.WARNING), open_source(path) as source:
        assert list(source.gene_ids) == list(ensembl_cells.var_names)  # "no gene identifier row attribute" before
        counts = sp.vstack([c.counts for c in source.iter_chunks(7)])
    assert (counts != ensembl_cells.X).nnz == 0
    assert "'gene_id'" in caplog.text and str(path) in caplog.text
    with open_source(path, gene_column="symbol") as source:  # another attribute, when asked for
        assert list(source.gene_ids) == list(ensembl_cells.var["symbol"])


def test_a_loom_of_two_or_no_ensembl_attributes_needs_gene_column(tmp_path, ensembl_cells):
    two = ensembl_cells.copy()
    two.var["ensembl_copy"] = two.var_names.str.replace(r"\.\d+$", "", regex=True)
    two.write_loom(tmp_path / "two.loom")
    symbols = ensembl_cells.copy()
    symbols.var = pd.DataFrame({"other": 1}, index=pd.Index(ensembl_cells.var["symbol"].to_numpy(), name="symbol"))
    symbols.write_loom(tmp_path / "symbols.loom")
    for name, listed in [("two", "['ensembl_copy', 'gene_id', 'symbol']"), ("symbols", "['other', 'symbol']")]:
        with pytest.raises(InputDataError, match="no gene identifier row attribute found .*" + re.escape(f"one of {listed}")):
            open_source(tmp_path / f"{name}.loom")
