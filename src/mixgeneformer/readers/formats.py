"""One CountSource per input format, and open_source, which picks it (the ``.h5ad`` reader is in
:mod:`.h5ad`, the TileDB-SOMA reader in :mod:`.soma`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, InputDataError
from ..fileio import check_readable_file, source_name
from ..genes import ensembl_species
from .base import (
    RAW_LAYER,
    CountInput,
    CountSource,
    _decode,
    _MatrixSource,
    _pick_gene_ids,
    check_compressed,
    checked_csr,
    missing_layer,
    reading,
)
from .h5ad import _H5adSource
from .mtx import _find_one, _gene_expression_features, _mtx_source
from .soma import _is_soma, _SomaSource

logger = logging.getLogger(__name__)


class _BackedSource(_H5adSource):
    """A backed AnnData (not a view): counts streamed from its file (X, or ``raw/X`` for
    ``layer="raw"``), gene IDs and obs from the object (changes made to its var / obs since it was
    opened count, as for an in-memory AnnData)."""

    def __init__(self, adata: Any, layer: str | None, gene_column: str | None, allow_fractional: bool):
        super().__init__(Path(adata.filename), layer, None, allow_fractional)
        frame = adata.raw if self.reads_raw else adata
        if (self.n_cells, self.n_genes) != (adata.n_obs, frame.n_vars):
            raise InputDataError(f"{self.name}: the file holds {self.n_cells} × {self.n_genes} counts but the backed "
                                 f"AnnData{'.raw' if self.reads_raw else ''} is {adata.n_obs} × {frame.n_vars}; "
                                 "the file changed since it was opened: open it again.")
        self.gene_ids = _pick_gene_ids(frame.var, np.asarray(frame.var_names), gene_column, self.name)
        self._obs_frame = adata.obs
        self.obs_columns = [str(c) for c in adata.obs.columns]

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._obs_frame.index[start:stop])

    def _obs_column(self, column: str, start: int, stop: int) -> pd.Series:
        return self._obs_frame[column].iloc[start:stop]


def _reads_raw(adata: Any, layer: str | None) -> bool:
    """Whether ``layer`` reads ``adata.raw`` (``"raw"``, when no layer has that name and ``.raw`` is set)."""
    return layer == RAW_LAYER and layer not in adata.layers and getattr(adata, "raw", None) is not None


def _anndata_source(adata: Any, layer: str | None, gene_column: str | None, allow_fractional: bool) -> CountSource:
    name = source_name(adata)
    if getattr(adata, "isbacked", False):
        if adata.is_view:  # a selection of a backed file's cells / genes: read just those, in the view's order
            with reading(str(adata.filename), f"reading the {adata.n_obs} × {adata.n_vars} view of the backed AnnData"):
                adata = adata.to_memory()
        elif layer is None or _reads_raw(adata, layer):  # X / raw stay on disk (a backed object's layers are in memory)
            return _BackedSource(adata, layer, gene_column, allow_fractional)
    raw = getattr(adata, "raw", None)
    if _reads_raw(adata, layer):
        source = _MatrixSource(raw.X, _pick_gene_ids(raw.var, np.asarray(raw.var_names), gene_column, f"{name}.raw"),
                               adata.obs, name, allow_fractional)
        source.reads_raw = True
        return source
    layers = sorted(adata.layers.keys())
    raw_genes = None if raw is None else int(raw.n_vars)
    if layer is not None and layer not in layers:
        raise missing_layer(name, layer, layers, raw_genes)
    if layer == RAW_LAYER and raw is not None:
        logger.warning("%s: layer='raw' reads its layer named 'raw'; its .raw (adata.raw.X) is not read.", name)
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None and not layers and raw is None:
        raise InputDataError(f"{name}: holds no count matrix (X is None, no layers, no .raw); put the counts in X.")
    if matrix is None:
        raise InputDataError(f"{name}: X is empty; pass layer=... Available layers: {layers}"
                             + (" (or layer='raw': its .raw)." if raw is not None else "."))
    gene_ids = _pick_gene_ids(adata.var, np.asarray(adata.var_names), gene_column, name)
    source = _MatrixSource(matrix, gene_ids, adata.obs, name, allow_fractional)
    if raw is not None and RAW_LAYER not in layers:  # named when the matrix read holds no counts
        source._raw_beside = (lambda: raw.X, raw_genes)
    return source


class _LoomSource(CountSource):
    """``.loom``: a dense genes × cells matrix; cells are columns, read in column slabs."""

    _GENE_COLUMNS = ("ensembl_id", "Accession", "gene_ids", "Gene", "var_names")  # var_names: anndata's write_loom

    def __init__(self, path: Path, layer: str | None, gene_column: str | None, allow_fractional: bool):
        self.name = str(path)
        self.allow_fractional = allow_fractional
        self._file = h5py.File(path, "r")
        f = self._file
        if layer is None:
            self._matrix = f["matrix"]
        else:
            layers = sorted(f["layers"].keys()) if "layers" in f else []
            if layer not in layers:
                raise InputDataError(f"{path}: layer {layer!r} not found. Available layers: {layers} (or leave layer unset).")
            self._matrix = f["layers"][layer]
        self.n_genes, self.n_cells = (int(s) for s in self._matrix.shape)
        row_attrs = f["row_attrs"]
        available = sorted(row_attrs.keys())
        if gene_column is None:
            gene_column = next((c for c in self._GENE_COLUMNS if c in row_attrs), None) or _ensembl_attribute(row_attrs, path)
            if gene_column is None:
                raise InputDataError(
                    f"{path}: no gene identifier row attribute found (looked for {list(self._GENE_COLUMNS)} and for "
                    f"one attribute of Ensembl gene IDs). Pass gene_column= one of {available} (CLI: --gene-column NAME)."
                )
        elif gene_column not in row_attrs:
            raise InputDataError(f"{path}: gene_column {gene_column!r} not found in row_attrs. Available: {available}.")
        self.gene_ids = _decode(row_attrs[gene_column][()])
        if self.gene_ids.shape != (self.n_genes,):
            raise InputDataError(f"{path}: row attribute {gene_column!r} has {self.gene_ids.shape} entries for "
                                 f"{self.n_genes} matrix rows (genes); the file is damaged: export it again.")
        self._col_attrs = f["col_attrs"]
        self._cell_key = next((k for k in ("CellID", "obs_names", "cell_id") if k in self._col_attrs), None)
        # a column attribute of more than one value a cell (an embedding, anndata's write_obsm_varm) is no obs
        # column: read it as obsm (:meth:`obsm`), as anndata's read_loom does
        shaped = {k: self._col_attrs[k].ndim for k in self._col_attrs.keys() if k != self._cell_key}
        self.obs_columns = [k for k, ndim in shaped.items() if ndim == 1]
        self._obsm_keys = [k for k, ndim in shaped.items() if ndim > 1]
        for key in self._col_attrs.keys():  # one entry per cell (matrix column): names and obs stay aligned
            attr = self._col_attrs[key]
            if isinstance(attr, h5py.Dataset) and attr.shape[:1] != (self.n_cells,):
                raise InputDataError(f"{path}: column attribute {key!r} has {attr.shape[:1] or 'no'} entries for "
                                     f"{self.n_cells} matrix columns (cells); the file is damaged: export it again.")

    def close(self) -> None:
        self._file.close()

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(np.ascontiguousarray(self._matrix[:, start:stop].T))

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        if self._cell_key is None:
            return np.arange(start, stop).astype(str).astype(object)
        return _decode(self._col_attrs[self._cell_key][start:stop])

    def _obs_column(self, column: str, start: int, stop: int) -> np.ndarray:
        values = self._col_attrs[column][start:stop]
        return _decode(values) if np.asarray(values).dtype.kind in "SO" else np.asarray(values)

    def obsm(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        return {key: np.asarray(self._col_attrs[key][start:stop]) for key in self._obsm_keys}


#: share of a row attribute's values that must be Ensembl gene IDs for a loom's genes to be read from it
_ENSEMBL_SHARE = 0.9


def _ensembl_attribute(row_attrs: h5py.Group, path: Path) -> str | None:
    """The one row attribute of a loom whose values are mostly (``_ENSEMBL_SHARE``) Ensembl gene IDs
    (versions allowed; anndata's write_loom names the var index's attribute after the index's name,
    e.g. ``gene_id``), or None when there is none or more than one (logged: which one is read)."""
    found = []
    for name in sorted(row_attrs.keys()):
        values = row_attrs[name]
        if not isinstance(values, h5py.Dataset) or values.ndim != 1 or values.dtype.kind not in "SOU" or not len(values):
            continue
        if np.mean(ensembl_species(_decode(values[()])) != "") >= _ENSEMBL_SHARE:
            found.append(name)
    if len(found) != 1:
        return None
    logger.warning("%s: no row attribute %s; reading the gene IDs from %r, its attribute of Ensembl gene IDs "
                "(gene_column= / --gene-column NAME reads another).", path, "/".join(_LoomSource._GENE_COLUMNS), found[0])
    return found[0]


class _TenxH5Source(CountSource):
    """CellRanger ``filtered_feature_bc_matrix.h5`` (v3) or v2 (one group per genome).

    The file stores genes × cells in CSC, i.e. cells × genes in CSR: read in row slices.
    """

    def __init__(self, path: Path, gene_column: str | None, allow_fractional: bool):
        self.name = str(path)
        self.allow_fractional = allow_fractional
        self._file = h5py.File(path, "r")
        f = self._file
        if "matrix" in f:
            group = f["matrix"]
            features = group["features"]
            table = {k: _decode(features[k][()]) for k in features.keys() if isinstance(features[k], h5py.Dataset) and features[k].ndim == 1 and len(features[k]) == int(group["shape"][0])}
        else:
            genomes = [k for k in f.keys() if isinstance(f[k], h5py.Group) and "indptr" in f[k]]
            if len(genomes) > 1:  # CellRanger v2 of a multi-genome reference (e.g. a human + mouse barnyard)
                raise InputDataError(f"{path}: a CellRanger v2 .h5 of {len(genomes)} genomes ({', '.join(sorted(genomes))}), "
                                     "read one at a time: write each as an .h5ad (scanpy.read_10x_h5(path, genome="
                                     f"{sorted(genomes)[0]!r}).write_h5ad(...)) and pass those.")
            if len(genomes) != 1:
                raise InputDataError(f"{path}: not a recognised 10x .h5 file (groups: {sorted(f.keys())}).")
            group = f[genomes[0]]
            table = {"id": _decode(group["genes"][()]), "name": _decode(group["gene_names"][()])}
        self._group = group
        column = "id" if gene_column is None else gene_column
        if column not in table:
            raise InputDataError(f"{path}: gene_column {column!r} not found; available feature fields: {sorted(table)}.")
        gene_ids = table[column]
        n_genes, self.n_cells = (int(s) for s in group["shape"][()])
        self._indptr = group["indptr"][()].astype(np.int64)
        check_compressed(self._indptr, self.n_cells, group["indices"].shape[0], self.name)
        self._all_genes = n_genes
        keep = _gene_expression_features(table.get("feature_type"))
        self._keep = keep
        self.gene_ids = gene_ids if keep is None else gene_ids[keep]
        self.n_genes = len(self.gene_ids)
        self.obs_columns = []

    def close(self) -> None:
        self._file.close()

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(self._indptr[start]), int(self._indptr[stop])
        counts = checked_csr(sp.csr_matrix(
            (self._group["data"][lo:hi], self._group["indices"][lo:hi], self._indptr[start : stop + 1] - lo),
            shape=(stop - start, self._all_genes),
        ), self.name, start)
        return counts if self._keep is None else counts[:, self._keep]

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return _decode(self._group["barcodes"][start:stop])

    def _obs_column(self, column: str, start: int, stop: int) -> np.ndarray:
        raise KeyError(column)


def _refuse_obs_filter(obs_filter: str | None, item: CountInput) -> None:
    """ConfigError for an ``obs_filter`` given for an input that is not a TileDB-SOMA experiment (or empty)."""
    if obs_filter is None:
        return
    if not isinstance(obs_filter, str) or not obs_filter.strip():
        raise ConfigError(f"obs_filter={obs_filter!r}: give a tiledbsoma value_filter such as \"tissue_general == "
                          "'pancreas'\", or leave it unset to read every cell.")
    if not isinstance(item, (str, os.PathLike)) or not _is_soma(Path(item)):
        what = str(item) if isinstance(item, (str, os.PathLike)) else f"the {type(item).__name__} input"
        raise ConfigError(f"obs_filter (--obs-filter) selects cells of a TileDB-SOMA experiment only, and {what} is not "
                          "one: select the cells before writing it (e.g. adata[adata.obs.tissue == 'pancreas']), or "
                          "leave obs_filter unset.")


# long: a 30-line docstring; the body (37 lines) picks one reader per format.
def open_source(
    path_or_adata: CountInput,
    layer: str | None = None,
    gene_column: str | None = None,
    *,
    allow_fractional: bool = False,
    measurement: str = "RNA",
    obs_filter: str | None = None,
    cells: tuple[int, int] | None = None,
) -> CountSource:
    """Open any supported count input for chunked reading.

    Parameters
    ----------
    path_or_adata
        An :class:`anndata.AnnData` (in memory or backed), or a path to a ``.h5ad``, ``.loom``,
        10x ``.h5`` file, a 10x folder with ``matrix.mtx[.gz]``, or a TileDB-SOMA experiment.
    layer
        Read counts from this layer instead of ``X`` (SOMA: the X layer name, default ``"data"``).
        ``"raw"`` (:data:`RAW_LAYER`) reads an AnnData's / h5ad's ``.raw`` (``adata.raw.X``, streamed
        from ``raw/X`` in a file, with the genes of ``adata.raw.var``, where ``gene_column`` is looked
        up) unless it has a layer named ``"raw"``, which is read as before.
    gene_column
        var column (loom row attribute, 10x feature field) holding gene identifiers; default the
        var index (loom: ``ensembl_id``/``Accession``/``gene_ids``/``Gene``/``var_names``, else its one row
        attribute of Ensembl gene IDs; 10x: ``id``; SOMA: ``var_id``).
    allow_fractional
        Accept non-integer counts (negative / NaN / Inf are always errors).
    measurement
        SOMA measurement name.
    obs_filter
        SOMA only (a :class:`~mixgeneformer.errors.ConfigError` for any other input): read just the
        cells this tiledbsoma ``value_filter`` over obs selects (e.g. ``"tissue_general == 'pancreas'
        and is_primary_data == True"``), in soma_joinid order; the source's cells are those.
    cells
        ``(start, stop)``: only cells ``[start, stop)`` will be read (a shard's). A 10x mtx folder, which
        is text parsed whole, then keeps just their counts (its source still numbers every cell, and
        reading another is an error); the other formats read any cells on demand and ignore it.

    Returns
    -------
    CountSource
        Use ``iter_chunks`` to stream it; close it (or use it as a context manager) when done.
    """
    if not isinstance(path_or_adata, (str, os.PathLike)):
        _refuse_obs_filter(obs_filter, path_or_adata)
        if hasattr(path_or_adata, "obs") and hasattr(path_or_adata, "var"):
            return _anndata_source(path_or_adata, layer, gene_column, allow_fractional)
        raise InputDataError(
            f"cannot read counts from a {type(path_or_adata).__name__}; pass an AnnData or a path to "
            ".h5ad / .loom / 10x .h5 / a 10x mtx folder / a TileDB-SOMA experiment."
        )
    path = check_readable_file(path_or_adata, "count matrix")
    _refuse_obs_filter(obs_filter, path)
    if path.is_dir():
        if _is_soma(path):
            with reading(str(path), "opening it as a TileDB-SOMA experiment"):
                return _SomaSource(str(path), layer, gene_column, measurement, allow_fractional, obs_filter)
        if _find_one(path, ["matrix.mtx"]) is not None:
            if layer is not None:
                raise InputDataError(f"{path}: a 10x mtx folder has no layers; remove layer={layer!r} (set by a model's tokenize.yaml: --tokenize-config FILE holding `layer: null`).")
            with reading(str(path), "reading it as a 10x mtx folder"):
                return _mtx_source(path, gene_column, allow_fractional, cells)
        raise InputDataError(
            f"{path} is a folder but neither a 10x mtx folder (matrix.mtx[.gz]) nor a TileDB-SOMA experiment."
        )
    suffix = path.name.lower()
    if suffix.endswith(".loom"):
        with reading(str(path), "opening it as a .loom file"):
            return _LoomSource(path, layer, gene_column, allow_fractional)
    if suffix.endswith((".h5ad", ".h5")):
        try:
            with h5py.File(path, "r") as f:
                is_h5ad = "X" in f or ("obs" in f and "var" in f)
        except OSError as exc:
            raise InputDataError(f"{path} could not be opened as HDF5 ({exc}); the file may be truncated.") from exc
        if is_h5ad:
            with reading(str(path), "opening it as an .h5ad file"):
                return _H5adSource(path, layer, gene_column, allow_fractional)
        if layer is not None:
            raise InputDataError(f"{path}: a 10x .h5 file has no layers; remove layer={layer!r} (set by a model's tokenize.yaml: --tokenize-config FILE holding `layer: null`).")
        with reading(str(path), "opening it as a 10x .h5 file"):
            return _TenxH5Source(path, gene_column, allow_fractional)
    raise InputDataError(
        f"{path}: unsupported file type. Supported: .h5ad, .loom, 10x .h5, a 10x mtx folder, a TileDB-SOMA "
        "experiment folder, or an AnnData object."
    )
