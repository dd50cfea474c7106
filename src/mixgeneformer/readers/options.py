"""Reader options and the chunk helpers shared by the median and tokenization stages."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, GeneIdError, InputDataError
from ..genes import SPECIES, GeneMapping, map_gene_ids
from ..jit import njit
from .base import CountChunk, CountInput, CountSource, as_csr
from .formats import open_source


@dataclass(frozen=True)
class ReadOptions:
    """How counts and gene identifiers are read from an input: one set of options for the median
    stage, the tokenizer (:attr:`TokenizeConfig.read_options`) and the CLI.

    Attributes
    ----------
    layer, gene_column, measurement, allow_fractional
        Passed to :func:`open_source` (``layer="raw"`` reads an AnnData's / h5ad's ``.raw``).
    species, min_coverage, allow_mixed_species
        Passed to :func:`map_source_genes` (``"auto"`` detects the species per input).
    totals
        Cell totals for normalization: ``"all"`` (n_counts over all genes) or ``"kept"``
        (vocabulary genes only); see :func:`normalization_totals`.
    chunk_size
        Cells per chunk (bounds memory: about 50 bytes per stored nonzero).
    obs_filter
        TileDB-SOMA inputs only: read just the cells this tiledbsoma ``value_filter`` over obs selects
        (see :func:`open_source`); any other input is refused with a ConfigError.
    """

    layer: str | None = None
    gene_column: str | None = None
    species: str = "auto"
    min_coverage: float = 0.5
    allow_mixed_species: bool = False
    allow_fractional: bool = False
    measurement: str = "RNA"
    totals: str = "all"
    chunk_size: int = 4096
    obs_filter: str | None = None

    def __post_init__(self) -> None:
        if self.species not in ("auto", *SPECIES):  # before any worker starts or any file is read
            raise ConfigError(f"species={self.species!r}: use 'auto' or one of {list(SPECIES)}.")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ConfigError(f"min_coverage={self.min_coverage} is a fraction of gene IDs: give a value from 0 to 1 (e.g. 0.5).")

    def open(self, path_or_adata: CountInput) -> CountSource:
        """:func:`open_source` with these options."""
        return open_source(path_or_adata, self.layer, self.gene_column, allow_fractional=self.allow_fractional,
                           measurement=self.measurement, obs_filter=self.obs_filter)

    def map_genes(self, source: CountSource, vocabulary_ids: Collection[str] | None = None) -> GeneMapping:
        """:func:`map_source_genes` with these options."""
        return map_source_genes(source, self.species, self.min_coverage, self.allow_mixed_species, vocabulary_ids)


def map_source_genes(
    source: CountSource,
    species: str = "auto",
    min_coverage: float = 0.5,
    allow_mixed: bool = False,
    vocabulary_ids: Collection[str] | None = None,
) -> GeneMapping:
    """Resolve a source's gene identifiers to Ensembl IDs (:func:`genes.map_gene_ids`).

    ``vocabulary_ids``: Ensembl IDs of the vocabulary in use, which map to themselves even when
    the shipped gene table lacks them. Returns the :class:`~mixgeneformer.genes.GeneMapping`;
    errors name the source.
    """
    try:
        return map_gene_ids(
            source.gene_ids, species=species, allow_mixed=allow_mixed, min_coverage=min_coverage, vocabulary_ids=vocabulary_ids
        )
    except GeneIdError as exc:
        raise GeneIdError(f"{source.name}: {exc}") from exc


def check_distinct_inputs(items: Sequence[CountInput]) -> None:
    """Refuse an input listed twice (the same file under any path, or the same AnnData object).

    Its cells would silently count twice in medians and corpora.
    """
    seen: dict[Any, Any] = {}
    for position, item in enumerate(items, start=1):
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            try:
                stat = path.stat()
                key: Any = ("file", stat.st_dev, stat.st_ino)
            except OSError:
                key = ("path", str(path.resolve()))
        else:
            key = ("object", id(item))
        if key in seen:
            first_position, first = seen[key]
            if key[0] == "object":
                name = f"the {type(item).__name__} object given as input {first_position}"
            elif str(first) == str(item):
                name = str(item)
            else:
                name = f"{item} (the same file as {first})"
            raise InputDataError(
                f"inputs {first_position} and {position} are the same: {name}; its cells would count twice. "
                "Give each input once."
            )
        seen[key] = (position, item)


TOTALS_COLUMN = "n_counts"


FILTER_COLUMN = "filter_pass"


@njit
def _row_sums(indptr, data, out):  # pragma: no cover - numba
    for r in range(len(indptr) - 1):
        total = 0.0
        for j in range(indptr[r], indptr[r + 1]):
            total += data[j]
        out[r] = total


def row_sums(counts: sp.csr_matrix | sp.spmatrix | np.ndarray) -> np.ndarray:
    """Per-row sums of a cells × genes matrix as float64: for CSR one compiled pass, no upcast copy of
    the data; another sparse format or a dense array is converted to CSR first (the compiled pass
    reads ``indptr`` as row pointers: a CSC matrix read so gave column sums, out of bounds)."""
    counts = as_csr(counts)
    out = np.empty(counts.shape[0], dtype=np.float64)
    _row_sums(counts.indptr, counts.data, out)
    return out


def normalization_totals(chunk: CountChunk, mode: str = "all", kept_columns: np.ndarray | None = None) -> np.ndarray:
    """Per-cell totals used to normalize counts (float64, one per row of ``chunk``).

    ``"all"`` (Geneformer default): obs ``n_counts`` when the source has it, else the row sums over
    all genes. ``"kept"`` (the authors' variant): row sums over ``kept_columns`` (a boolean mask).

    An ``n_counts`` that is missing (NaN), non-numeric, infinite or negative for a cell, or 0 for a
    cell with counts, is an :class:`InputDataError` naming the column, the cell and the fix; it is not
    replaced by row sums for those cells, since ``n_counts`` may count genes the matrix no longer
    holds (totals taken before gene filtering) and the cells of one input would be normalized two
    ways. Without the column every cell's total is its row sum.
    """
    if mode == "all":
        if TOTALS_COLUMN in chunk.obs.columns:
            totals = pd.to_numeric(chunk.obs[TOTALS_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
            unusable = ~np.isfinite(totals) | (totals < 0)
            if unusable.any():
                raise InputDataError(_unusable_totals(chunk, unusable))
            stale = (totals == 0) & (np.diff(chunk.counts.indptr) > 0)
            if stale.any():
                raise InputDataError(
                    f"obs column {TOTALS_COLUMN!r} is 0 for {int(stale.sum())} cells that have counts (first: cell "
                    f"{chunk.start + int(np.flatnonzero(stale)[0])}); it is stale (computed before a filter or on "
                    "another matrix): recompute it from the raw counts or drop the column so totals are computed."
                )
            return totals
        return row_sums(chunk.counts)
    if mode == "kept":
        if kept_columns is None:
            raise ValueError("kept_columns is required for totals='kept'")
        counts = chunk.counts
        keep = np.asarray(kept_columns, dtype=bool)[counts.indices]
        rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
        return np.bincount(rows[keep], weights=counts.data[keep].astype(np.float64), minlength=counts.shape[0])
    raise InputDataError(f"totals must be 'all' or 'kept', got {mode!r}.")


def _unusable_totals(chunk: CountChunk, unusable: np.ndarray) -> str:
    """The message for a chunk whose obs ``n_counts`` is unusable (``unusable``: the cells' mask)."""
    first = int(np.flatnonzero(unusable)[0])
    value = chunk.obs[TOTALS_COLUMN].iloc[first]
    shown = repr(value) if isinstance(value, str) else str(value)
    return (
        f"obs column {TOTALS_COLUMN!r} (each cell's total count, which normalizes it with totals='all') is missing "
        f"(NaN), non-numeric, infinite or negative for {int(unusable.sum())} of cells {chunk.start}–"
        f"{chunk.start + chunk.n_cells - 1} (first: cell {chunk.start + first} ({chunk.obs.index[first]}) = "
        f"{shown}), e.g. after concatenating inputs of which only some had it. It is not "
        "replaced by row sums for those cells: n_counts may count genes the matrix no longer holds, and the cells would "
        f"be normalized two ways. Recompute it for every cell from the raw counts read (adata.obs[{TOTALS_COLUMN!r}] = "
        "np.asarray(counts.sum(axis=1)).ravel(), counts: X, the layer read or adata.raw.X), or delete it (del "
        f"adata.obs[{TOTALS_COLUMN!r}]: every total is then the row sum of the counts read), and write the file again."
    )


def filter_pass_rows(chunk: CountChunk) -> np.ndarray | None:
    """Boolean mask of cells to keep when obs has ``filter_pass`` (1 = keep), else None."""
    if FILTER_COLUMN not in chunk.obs.columns:
        return None
    values = pd.to_numeric(chunk.obs[FILTER_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
    return values == 1


def remap_columns(counts: sp.csr_matrix, column_map: np.ndarray, n_out: int) -> sp.csr_matrix:
    """Move column ``j`` to ``column_map[j]`` (dropped where ``-1``); columns mapped together are summed.

    Implemented as one sparse product with a 0/1 selection matrix (vectorized, exact for integer
    counts), so duplicate gene IDs after mapping are summed as Geneformer does.
    """
    column_map = np.asarray(column_map, dtype=np.int64)
    src = np.flatnonzero(column_map >= 0)
    merges = len(np.unique(column_map[src])) < len(src)
    if merges and counts.dtype.kind in "iu" and counts.dtype.itemsize < 8:
        counts = counts.astype(np.int64)  # a sum of small integer types would wrap (uint8: 200 + 200 = 144)
    selection = sp.csr_matrix(
        (np.ones(len(src), dtype=counts.dtype), (src, column_map[src])), shape=(counts.shape[1], n_out)
    )
    out = sp.csr_matrix(counts @ selection)
    out.sum_duplicates()
    return out
