"""The ``.h5ad`` reader: counts read with h5py (CSR in row slices, dense in row slabs, CSC by bounded
block scans) and obs / var columns sliced on disk, never the whole matrix at once."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputDataError
from .base import RAW_LAYER, CountSource, _decode, check_compressed, checked_csr, missing_layer

logger = logging.getLogger(__name__)

# Rows read per h5py call are bounded by the chunk size the caller asks for; CSC-on-disk inputs are
# scanned in blocks of this many stored entries so memory stays bounded.
_CSC_SCAN_BLOCK = 1 << 24


def _read_h5_frame_column(
    group: h5py.Group | h5py.Dataset, start: int = 0, stop: int | None = None
) -> np.ndarray | pd.Series:
    """Rows [start, stop) of one h5ad dataframe column; plain arrays and categoricals are sliced on disk."""

    if isinstance(group, h5py.Dataset) and group.ndim == 1:
        values = group[start:stop]
        return _decode(values) if values.dtype.kind in "SO" else values
    if isinstance(group, h5py.Group) and group.attrs.get("encoding-type") == "categorical":
        categories = np.asarray(ad.io.read_elem(group["categories"]))
        codes = group["codes"][start:stop]
        ordered = bool(group.attrs.get("ordered", False))
        return pd.Series(pd.Categorical.from_codes(codes, categories, ordered=ordered))
    value = ad.io.read_elem(group)  # other encodings (nullable arrays, …): read whole, then slice
    if isinstance(value, pd.Categorical):
        value = pd.Series(value)
    return value.iloc[start:stop] if isinstance(value, pd.Series) else value[start:stop]


def _raw_group(f: h5py.File) -> h5py.Group | None:
    """The ``raw`` group of an h5ad (``adata.raw``: ``raw/X`` and ``raw/var``), or None (absent, or a
    null element as earlier versions of this package wrote)."""
    raw = f.get("raw")
    if isinstance(raw, h5py.Group) and "X" in raw and "var" in raw:
        return raw
    return None


def _h5_shape(x: h5py.Group | h5py.Dataset) -> tuple[int, ...]:
    """Shape of an h5ad matrix: a dense dataset's, or a sparse group's ``shape`` attribute."""
    if isinstance(x, h5py.Dataset):
        return tuple(int(s) for s in x.shape)
    return tuple(int(s) for s in x.attrs.get("shape", x.attrs.get("h5sparse_shape")))


def _h5_gene_ids(var_group: h5py.Group, gene_column: str | None, where: str, what: str) -> np.ndarray:
    """Gene identifiers of an h5ad var group (``what``: "var" or "raw.var"): its index, or ``gene_column``."""
    index_key = var_group.attrs.get("_index", "_index")
    if gene_column is None:
        return np.asarray(_decode(var_group[index_key][()])).astype(str).astype(object)
    var_cols = [k for k in var_group.keys() if k not in (index_key, "__categories")]
    if gene_column not in var_cols:
        raise InputDataError(
            f"{where}: gene_column {gene_column!r} not found in {what}. Available {what} columns: "
            f"{sorted(var_cols)} (or leave gene_column unset to use {what}_names)."
        )
    return np.asarray(_read_h5_frame_column(var_group[gene_column])).astype(str).astype(object)


class _H5adSource(CountSource):
    """``.h5ad`` read with h5py: CSR in row slices, dense in row slabs, CSC by bounded block scans."""

    def __init__(self, path: Path, layer: str | None, gene_column: str | None, allow_fractional: bool):
        self.name = str(path)
        self.allow_fractional = allow_fractional
        try:
            self._file = h5py.File(path, "r")
        except OSError as exc:
            raise InputDataError(f"{path} could not be opened as HDF5 ({exc}); is it a complete .h5ad file?") from exc
        f = self._file
        self._x, var_group = self._counts_and_var(layer)
        self._obs_group = f["obs"]
        self.gene_ids = _h5_gene_ids(var_group, gene_column, f"{path}", "raw.var" if self.reads_raw else "var")
        index_key = self._obs_group.attrs.get("_index", "_index")
        self.obs_columns = [k for k in self._obs_group.keys() if k not in (index_key, "__categories")]
        self._index_key = index_key
        x = self._x
        if isinstance(x, h5py.Dataset):
            self._kind = "dense"
            shape = x.shape
        else:
            encoding = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
            encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
            if encoding in ("csr_matrix", "csr"):
                self._kind = "csr"
            elif encoding in ("csc_matrix", "csc"):
                self._kind = "csc"
            else:
                raise InputDataError(f"{path}: unsupported matrix encoding {encoding!r} for the counts.")
            shape = _h5_shape(x)
            self._indptr = x["indptr"][()].astype(np.int64)
            if x["data"].shape != x["indices"].shape:
                raise InputDataError(f"{path}: the sparse count matrix is corrupt ({x['data'].shape[0]} values but "
                                     f"{x['indices'].shape[0]} indices); export the file again.")
            check_compressed(self._indptr, shape[0] if self._kind == "csr" else shape[1], x["indices"].shape[0], str(path))
        if len(shape) != 2:
            raise InputDataError(f"{path}: the count matrix has shape {shape}; a cells × genes matrix is expected.")
        self.n_cells, self.n_genes = int(shape[0]), int(shape[1])
        if len(self.gene_ids) != self.n_genes:
            raise InputDataError(f"{path}: {len(self.gene_ids)} var entries but the matrix has {self.n_genes} columns.")

    def _counts_and_var(self, layer: str | None) -> tuple[h5py.Group | h5py.Dataset, h5py.Group]:
        """The count matrix to read (X, a layer, or ``raw/X`` for ``layer="raw"``) and its var group."""
        f, path, layers = self._file, self.name, self._layers()
        raw = _raw_group(f)
        if layer is None or layer in layers:
            if layer is None and "X" not in f and not layers and raw is None:
                raise InputDataError(f"{path}: holds no count matrix (no X, no layers, no .raw); write the counts into X "
                                     "and pass the file again.")
            if layer is None and "X" not in f:
                raise InputDataError(f"{path}: no X matrix; pass layer=... Available layers: {layers}"
                                     + (" (or layer='raw': its .raw)." if raw is not None else "."))
            if raw is not None and RAW_LAYER not in layers:  # named when the matrix read holds no counts
                self._raw_beside = (lambda: raw["X"], _h5_shape(raw["X"])[1])
            elif raw is not None and layer == RAW_LAYER:
                logger.warning("%s: layer='raw' reads its layer named 'raw'; its .raw (raw/X) is not read.", path)
            return (f["X"] if layer is None else f["layers"][layer]), f["var"]
        if layer == RAW_LAYER and raw is not None:
            self.reads_raw = True
            return raw["X"], raw["var"]
        raise missing_layer(path, layer, layers, None if raw is None else _h5_shape(raw["X"])[1])

    def _layers(self) -> list[str]:
        return sorted(self._file["layers"].keys()) if "layers" in self._file else []

    def close(self) -> None:
        self._file.close()

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        x = self._x
        if self._kind == "dense":
            return sp.csr_matrix(x[start:stop])
        if self._kind == "csr":
            lo, hi = int(self._indptr[start]), int(self._indptr[stop])
            data = x["data"][lo:hi]
            indices = x["indices"][lo:hi]
            indptr = self._indptr[start : stop + 1] - lo
            return checked_csr(sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.n_genes)), self.name, start)
        return self._read_rows_csc(start, stop)

    def stored_per_cell(self, chunk_size: int = 100_000) -> np.ndarray:
        if self._kind == "csr":  # the row pointer (read and checked at open) holds it: no count is read
            return np.diff(self._indptr)
        return super().stored_per_cell(chunk_size)

    def _read_rows_csc(self, start: int, stop: int) -> sp.csr_matrix:
        # Column-major storage: scan all stored entries in bounded blocks, keep rows in [start, stop).
        x = self._x
        indptr = self._indptr
        nnz = int(indptr[-1])
        rows_parts, cols_parts, data_parts = [], [], []
        for lo in range(0, nnz, _CSC_SCAN_BLOCK):
            hi = min(lo + _CSC_SCAN_BLOCK, nnz)
            rows = x["indices"][lo:hi]
            if rows.size and (rows.min() < 0 or rows.max() >= self.n_cells):
                raise InputDataError(f"{self.name}: the sparse count matrix is corrupt (a row index outside 0–"
                                     f"{self.n_cells - 1}); export the file again.")
            keep = (rows >= start) & (rows < stop)
            if not keep.any():
                continue
            pos = np.flatnonzero(keep)
            cols = np.searchsorted(indptr, pos + lo, side="right") - 1
            rows_parts.append(rows[pos] - start)
            cols_parts.append(cols)
            data_parts.append(x["data"][lo:hi][pos])
        if not rows_parts:
            return sp.csr_matrix((stop - start, self.n_genes), dtype=x["data"].dtype)
        coo = sp.coo_matrix(
            (np.concatenate(data_parts), (np.concatenate(rows_parts), np.concatenate(cols_parts))),
            shape=(stop - start, self.n_genes),
        )
        return coo.tocsr()

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return _decode(self._obs_group[self._index_key][start:stop])

    def _obs_column(self, column: str, start: int, stop: int) -> pd.Series | np.ndarray:
        return _read_h5_frame_column(self._obs_group[column], start, stop)
