"""A 10x ``matrix.mtx`` folder (Matrix Market text, genes × barcodes, with ``features.tsv`` and
``barcodes.tsv``): parsed in chunks of entries into compact arrays, keeping only the cells asked for.

Matrix Market is text and cannot be row-sliced: the whole file is parsed once, ``_MTX_CHUNK``
entries at a time (int32 indices, the header's value type), and only the entries of the cells
``[start, stop)`` asked for (``open_source(..., cells=...)``: a shard of a sharded run) are kept, so
a process holds about its share of the matrix plus one chunk, never a table of the whole file.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputDataError
from .base import _MatrixSource, _pick_gene_ids

#: entries (lines) of a matrix.mtx parsed at a time: ~5 MB of int64 columns, ~60 MB of parser buffers a chunk
_MTX_CHUNK = 200_000


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _find_one(folder: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.exists():
                return candidate
    return None


def _gene_expression_features(feature_type: pd.Series | np.ndarray | None) -> np.ndarray | None:
    """Column mask keeping 'Gene Expression' features (drops antibody / CRISPR features), or None."""
    if feature_type is None:
        return None
    types = np.asarray(feature_type).astype(str)
    keep = types == "Gene Expression"
    if keep.all() or not keep.any():
        return None
    return np.flatnonzero(keep)


class _CellRangeSource(_MatrixSource):
    """Cells ``[lo, lo + rows)`` of an input of ``n_cells`` cells, the only ones read (a 10x mtx folder,
    every cell or a shard's): numbered as in the whole input, so chunks, messages and obs are those of a
    whole read; asking for any other cell is a programming error. Closing it releases the matrix (the
    source holds it: :func:`read_anndata` assembles its AnnData after closing)."""

    def __init__(self, matrix: sp.csr_matrix, gene_ids: np.ndarray, obs: pd.DataFrame, name: str,
                 allow_fractional: bool, lo: int, n_cells: int):
        super().__init__(matrix, gene_ids, obs, name, allow_fractional)
        self._lo, self._hi = lo, lo + self.n_cells
        self.n_cells = n_cells

    def close(self) -> None:
        self._matrix = None

    def _local(self, start: int, stop: int) -> tuple[int, int]:
        if self._matrix is None:
            raise RuntimeError(f"{self.name}: the source is closed; open it again.")
        if start < self._lo or stop > self._hi:
            raise RuntimeError(f"{self.name}: cells {start}–{stop} asked for, but only cells {self._lo}–{self._hi} "
                               "were read (open_source(..., cells=...)).")
        return start - self._lo, stop - self._lo

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        return super()._read_rows(*self._local(start, stop))

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return super()._obs_names(*self._local(start, stop))

    def _obs_column(self, column: str, start: int, stop: int) -> pd.Series:
        return super()._obs_column(column, *self._local(start, stop))


def _mtx_source(folder: Path, gene_column: str | None, allow_fractional: bool,
                cells: tuple[int, int] | None = None) -> _CellRangeSource:
    """A 10x ``matrix.mtx`` folder, every cell or (``cells``) only the cells ``[start, stop)``."""
    matrix_path = _find_one(folder, ["matrix.mtx"])
    features = _find_one(folder, ["features.tsv", "genes.tsv"])
    barcodes = _find_one(folder, ["barcodes.tsv"])
    missing = [n for n, p in (("matrix.mtx[.gz]", matrix_path), ("features.tsv[.gz] or genes.tsv[.gz]", features), ("barcodes.tsv[.gz]", barcodes)) if p is None]
    if missing:
        raise InputDataError(f"10x folder {folder} lacks {missing}; a 10x mtx folder holds matrix.mtx, features/genes.tsv and barcodes.tsv.")
    with _open_text(features) as handle:
        feat = pd.read_csv(handle, sep="\t", header=None, dtype=str)
    feat.columns = ["id", "name", "feature_type", *[f"col{i}" for i in range(3, feat.shape[1])]][: feat.shape[1]]
    with _open_text(barcodes) as handle:
        names = pd.read_csv(handle, sep="\t", header=None, dtype=str).iloc[:, 0].to_numpy()
    shape, counts, lo = _read_mtx(matrix_path, cells)  # counts: cells [lo, lo + rows) × all genes
    if shape != (len(feat), len(names)):
        raise InputDataError(
            f"10x folder {folder}: matrix is {shape[0]} × {shape[1]} but there are {len(feat)} "
            f"features and {len(names)} barcodes; the files do not belong together."
        )
    column = "id" if gene_column is None else gene_column
    gene_ids = _pick_gene_ids(feat, feat["id"].to_numpy(), column, str(folder))
    keep = _gene_expression_features(feat.get("feature_type"))
    if keep is not None:
        counts, gene_ids = counts[:, keep], gene_ids[keep]
    obs = pd.DataFrame(index=pd.Index(names[lo : lo + counts.shape[0]]))
    return _CellRangeSource(counts, gene_ids, obs, str(folder), allow_fractional, lo, len(names))


def _read_header(handle, path: Path) -> tuple[int, int, int, bool]:
    """``(genes, cells, entries, integer values)`` of a Matrix Market coordinate file's header."""
    header = handle.readline()
    if not header.startswith("%%MatrixMarket") or "coordinate" not in header:
        raise InputDataError(f"{path} is not a Matrix Market coordinate file (header {header.strip()[:60]!r}).")
    if any(word in header.lower() for word in ("pattern", "symmetric", "hermitian")):
        raise InputDataError(f"{path}: a '{header.strip()[15:]}' matrix holds no plain counts; a 10x matrix.mtx "
                             "is 'coordinate integer general' (or real): export the raw counts again.")
    line = handle.readline()
    while line.startswith("%"):
        line = handle.readline()
    n_rows, n_cols, nnz = (int(x) for x in line.split())
    return n_rows, n_cols, nnz, "integer" in header


def _read_mtx(path: Path, cells: tuple[int, int] | None = None) -> tuple[tuple[int, int], sp.csr_matrix, int]:
    """A Matrix Market coordinate file (genes × cells): its header's shape, the cells × genes CSR of
    the cells ``[lo, hi)`` (``cells`` clipped to the file's; default every cell) and ``lo``. Parsed
    with pandas (much faster than scipy.io.mmread), ``_MTX_CHUNK`` entries at a time."""
    with _open_text(path) as handle:
        n_rows, n_cols, nnz, field_is_int = _read_header(handle, path)
        lo = 0 if cells is None else min(max(0, int(cells[0])), n_cols)
        hi = n_cols if cells is None else max(lo, min(int(cells[1]), n_cols))
        parts = _Entries(path, (n_rows, n_cols), lo, hi, nnz, np.int64 if field_is_int else np.float64)
        try:
            reader = pd.read_csv(handle, sep=r"\s+", header=None, names=["row", "col", "value"], chunksize=_MTX_CHUNK,
                                 dtype={"row": np.int64, "col": np.int64, "value": np.int64 if field_is_int else np.float64})
        except pd.errors.EmptyDataError:  # no entry line: an all-zero matrix, or a truncated file (checked below)
            reader = None
        if reader is not None:
            with reader:
                for table in reader:
                    parts.add(table["row"].to_numpy(), table["col"].to_numpy(), table["value"].to_numpy())
    if parts.read != nnz:
        raise InputDataError(f"{path}: header announces {nnz} entries but {parts.read} were read; the file is truncated.")
    return (n_rows, n_cols), parts.csr(), lo


class _Entries:
    """The entries of cells ``[lo, hi)`` of a genes × cells Matrix Market file of ``nnz`` entries, gathered
    chunk by chunk into int32 (cell - lo, gene) arrays and values, with whether they come sorted by (cell,
    gene). The arrays are allocated once for every entry (a whole read) or the range's expected share
    (grown if the file holds more there); pages never written take no memory."""

    def __init__(self, path: Path, shape: tuple[int, int], lo: int, hi: int, nnz: int, dtype: type):
        self.path, self.shape, self.lo, self.hi = path, shape, lo, hi
        self.index = np.int32 if max(shape) < 2**31 - 1 else np.int64
        whole = lo == 0 and hi == shape[1]
        room = max(0, nnz) if whole else int(max(0, nnz) * (hi - lo) / max(1, shape[1]) * 1.2) + _MTX_CHUNK
        try:
            self.arrays = [np.empty(room, self.index), np.empty(room, self.index), np.empty(room, dtype)]  # cell, gene, value
        except MemoryError:
            raise InputDataError(f"{path}: its header announces {nnz:,} entries, more than this machine's memory holds "
                                 "for the cells read: read fewer cells at a time (a sharded run, --num-shards N).") from None
        self.read = self.kept = 0
        self.ordered = True  # strictly increasing (cell, gene): the arrays are a canonical CSR as they are
        self._last = (-1, -1)

    def add(self, row: np.ndarray, col: np.ndarray, value: np.ndarray) -> None:
        """One parsed chunk: 1-based gene (row) and cell (col) numbers, and values."""
        for numbers, size, what in ((row, self.shape[0], "row (gene)"), (col, self.shape[1], "column (cell)")):
            bad = (numbers < 1) | (numbers > size)
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise InputDataError(f"{self.path}: entry {self.read + k + 1} has {what} number {int(numbers[k])}, "
                                     f"outside the header's 1–{size}; the file is damaged: export it again.")
        self.read += len(row)
        if self.lo > 0 or self.hi < self.shape[1]:
            keep = (col > self.lo) & (col <= self.hi)
            row, col, value = row[keep], col[keep], value[keep]
        if not len(row):
            return
        cell = (col - (self.lo + 1)).astype(self.index)
        gene = (row - 1).astype(self.index)
        if self.ordered:
            step_cell = np.diff(cell, prepend=self._last[0])
            step_gene = np.diff(gene, prepend=self._last[1])
            self.ordered = bool(((step_cell > 0) | ((step_cell == 0) & (step_gene > 0))).all())
            self._last = (int(cell[-1]), int(gene[-1]))
        end = self.kept + len(cell)
        if end > len(self.arrays[0]):  # more entries than expected there (or than the header says)
            self.arrays = [np.concatenate([a[: self.kept], np.empty(max(end, 2 * len(a)) - self.kept, a.dtype)])
                           for a in self.arrays]
        for array, part in zip(self.arrays, (cell, gene, value), strict=True):
            array[self.kept : end] = part
        self.kept = end

    def csr(self) -> sp.csr_matrix:
        """The cells × genes CSR (duplicates summed, columns sorted, as scipy's COO → CSR makes it)."""
        shape = (self.hi - self.lo, self.shape[0])
        cells, genes, values = (a[: self.kept] for a in self.arrays)
        self.arrays = []
        if self.ordered:  # a 10x export: already in CSR order; only the row pointer is missing
            indptr = np.concatenate([[0], np.cumsum(np.bincount(cells, minlength=shape[0]))])
            del cells
            return sp.csr_matrix((values, genes, indptr), shape=shape)
        return sp.coo_matrix((values, (cells, genes)), shape=shape).tocsr()
