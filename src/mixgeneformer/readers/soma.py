"""The TileDB-SOMA reader (a local CELLxGENE Census-style experiment), streamed by obs joinid.

Opening reads the var dataframe (small) and obs's ``soma_joinid`` column only (8 bytes a cell; with
``obs_filter``, the joinids of the cells the filter selects); the cell names (``obs_id``, or the
written AnnData index's own name) and any obs column asked for are read per chunk, by joinid, so
memory is bounded by the chunk even for a Census-sized obs with dozens of columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, InputDataError, name_list
from .base import CountSource, reading

_JOINID = "soma_joinid"


def _is_soma(path: Path) -> bool:
    return path.is_dir() and ((path / "__tiledb_group.tdb").exists() or (path / "__group").exists())


def _coords(joinids: np.ndarray) -> Any:
    """Read coordinates of sorted, distinct ``joinids``: one inclusive slice when they are consecutive."""
    if joinids.size and int(joinids[-1]) - int(joinids[0]) + 1 == joinids.size:
        return slice(int(joinids[0]), int(joinids[-1]))
    return joinids


def _index_column(frame: Any, names: list[str], default: str) -> str | None:
    """The column of a SOMA obs / var dataframe that holds the AnnData index it was written from: ``default``
    (``obs_id`` / ``var_id``: tiledbsoma.io's name for an unnamed index), else the index's own name, which
    tiledbsoma.io keeps in the ``soma_dataframe_original_index_name`` metadata (an h5ad whose obs index is
    named, e.g. ``barcode``, is written with a ``barcode`` column and no ``obs_id``); None when neither."""
    if default in names:
        return default
    try:
        original = json.loads(frame.metadata.get("soma_dataframe_original_index_name") or "null")
    except (TypeError, ValueError, AttributeError):
        return None
    return original if isinstance(original, str) and original in names and original != _JOINID else None


class _SomaSource(CountSource):
    """A TileDB-SOMA experiment: ``exp.ms[measurement].X[layer]`` read by obs joinid ranges."""

    def __init__(self, uri: str, layer: str | None, gene_column: str | None, measurement: str, allow_fractional: bool,
                 obs_filter: str | None = None):
        import tiledbsoma

        self.name = uri
        self.allow_fractional = allow_fractional
        self._exp = tiledbsoma.Experiment.open(uri)
        try:
            self._open(layer, gene_column, measurement)
            self._obs_joinids = self._select(obs_filter)
            self.n_cells = len(self._obs_joinids)
        except BaseException:
            self._exp.close()
            raise

    def _open(self, layer: str | None, gene_column: str | None, measurement: str) -> None:
        uri = self.name
        if measurement not in self._exp.ms:
            raise InputDataError(f"{uri}: measurement {measurement!r} not found. Available measurements: {sorted(self._exp.ms.keys())}.")
        ms = self._exp.ms[measurement]
        x_layer = "data" if layer is None else layer
        if x_layer not in ms.X:
            raise InputDataError(f"{uri}: X layer {x_layer!r} not found in measurement {measurement!r}. Available layers: {sorted(ms.X.keys())}.")
        self._x = ms.X[x_layer]
        var = ms.var.read().concat().to_pandas().sort_values(_JOINID)
        column = gene_column or _index_column(ms.var, list(var.columns), "var_id")
        if column is None:
            raise InputDataError(f"{uri}: var has no gene identifier column (var_id, or the index of the AnnData it was "
                                 f"written from); name one with gene_column (--gene-column). Var columns: {sorted(var.columns)}.")
        if column not in var.columns:
            raise InputDataError(f"{uri}: gene_column {column!r} not found in var. Available var columns: {sorted(var.columns)}.")
        self.gene_ids = var[column].astype(str).to_numpy().astype(object)
        self._var_joinids = var[_JOINID].to_numpy().astype(np.int64)
        obs = self._exp.obs
        names = list(obs.schema.names)
        self._cell_key = _index_column(obs, names, "obs_id")  # the cell names, as the AnnData written had them
        self.obs_columns = [c for c in names if c not in (_JOINID, self._cell_key)]
        # obs indexed by soma_joinid (Census, tiledbsoma.io) is read by coordinates, else by a joinid range filter
        self._by_coords = tuple(obs.index_column_names)[:1] == (_JOINID,)
        self.n_genes = len(var)

    def _select(self, obs_filter: str | None) -> np.ndarray:
        """The sorted joinids of the cells read: every cell of obs, or those ``obs_filter`` selects."""
        from tiledbsoma import SOMAError

        try:
            table = self._exp.obs.read(value_filter=obs_filter, column_names=[_JOINID]).concat()
        except SOMAError as exc:
            if obs_filter is None:
                raise
            problem = str(exc).replace("SOMAError: ", "").splitlines()[0]
            raise ConfigError(f"{self.name}: obs_filter {obs_filter!r} cannot be applied ({problem}). It is a tiledbsoma "
                              "value_filter over obs columns, e.g. \"tissue_general == 'pancreas' and is_primary_data == "
                              f"True\"; obs columns: {sorted(self.obs_columns)}.") from exc
        joinids = np.sort(table[_JOINID].to_numpy().astype(np.int64, copy=False))
        if obs_filter is not None and not joinids.size:
            raise InputDataError(f"{self.name}: obs_filter {obs_filter!r} selects no cell; check the column values "
                                 "(e.g. read a few obs rows with tiledbsoma) or leave this input out.")
        return joinids

    def close(self) -> None:
        self._exp.close()

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        joinids = self._obs_joinids[start:stop]
        table = self._x.read(coords=(_coords(joinids),)).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy()
        dim1 = table["soma_dim_1"].to_numpy()
        data = table["soma_data"].to_numpy()
        rows = np.searchsorted(joinids, dim0)
        cols = np.searchsorted(self._var_joinids, dim1)
        return sp.coo_matrix((data, (rows, cols)), shape=(stop - start, self.n_genes)).tocsr()

    def _read_obs(self, columns: Sequence[str], start: int, stop: int) -> pd.DataFrame:
        """obs ``columns`` of cells [start, stop), one row per cell in the source's (joinid) order."""
        joinids = self._obs_joinids[start:stop]
        wanted = [_JOINID, *dict.fromkeys(c for c in columns if c != _JOINID)]
        if self._by_coords or not joinids.size:
            table = self._exp.obs.read(coords=(_coords(joinids),), column_names=wanted).concat()
        else:
            bounds = f"{_JOINID} >= {int(joinids[0])} and {_JOINID} <= {int(joinids[-1])}"
            table = self._exp.obs.read(value_filter=bounds, column_names=wanted).concat()
        frame = table.to_pandas()
        rows = pd.Index(frame[_JOINID].to_numpy()).get_indexer(joinids)
        if (rows < 0).any():
            lost = joinids[rows < 0]
            raise InputDataError(f"{self.name}: obs has no row for {lost.size} cell(s) of X (soma_joinid {int(lost[0])} "
                                 "first); obs changed while it was read: open the experiment again.")
        return frame.iloc[rows].reset_index(drop=True)

    def _cell_names(self, frame: pd.DataFrame, start: int, stop: int) -> np.ndarray:
        if self._cell_key is None:
            return self._obs_joinids[start:stop].astype(str).astype(object)
        return frame[self._cell_key].astype(str).to_numpy()

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return self._cell_names(self._read_obs([self._cell_key] if self._cell_key else [], start, stop), start, stop)

    def _obs_column(self, column: str, start: int, stop: int) -> pd.Series:
        return self._read_obs([column], start, stop)[column]

    def obs(self, columns: Sequence[str] = (), start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """As :meth:`CountSource.obs`, with the cell names and every column read at once for the range."""
        columns = name_list(columns, "obs columns")
        self.check_obs_columns(columns)
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        with reading(self.name, f"reading obs of cells {start}–{stop - 1}"):
            read = self._read_obs([*([self._cell_key] if self._cell_key else []), *columns], start, stop)
        names = pd.Index(np.asarray(self._cell_names(read, start, stop)).astype(str), name=None)
        frame = pd.DataFrame(index=names)
        for column in columns:
            frame[column] = read[column].to_numpy()
        return frame
