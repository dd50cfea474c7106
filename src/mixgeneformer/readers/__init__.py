"""Streaming readers: every supported input format → chunks of raw counts (cells × genes CSR).

One interface over ``.h5ad`` (CSR, CSC or dense on disk; read directly with h5py in row chunks,
never the whole matrix at once), ``.loom`` (genes × cells), 10x Genomics ``.h5`` (CellRanger v2
and v3), a 10x ``matrix.mtx`` folder, an in-memory :class:`anndata.AnnData` (dense / CSR / CSC,
integer or float, also backed) and a TileDB-SOMA experiment. Each chunk is validated (raw counts:
finite, non-negative, integer unless ``allow_fractional``) with vectorized checks before anyone
uses it (RELIABILITY 1–3).

Usage::

    with open_source("cells.h5ad", layer="counts") as source:
        for chunk in source.iter_chunks(10_000, obs_columns=["cell_type"]):
            ...  # chunk.counts (csr), chunk.gene_ids, chunk.obs, chunk.start
"""

from __future__ import annotations

from .base import (
    CountChunk,
    CountInput,
    CountSource,
    canonical_csr,
    release_free_memory,
    validate_counts,
)
from .cells import COUNT_INPUTS, count_format, read_anndata
from .formats import open_source
from .options import (
    FILTER_COLUMN,
    TOTALS_COLUMN,
    ReadOptions,
    check_distinct_inputs,
    filter_pass_rows,
    map_source_genes,
    normalization_totals,
    remap_columns,
    row_sums,
)

__all__ = [
    "COUNT_INPUTS",
    "FILTER_COLUMN",
    "TOTALS_COLUMN",
    "CountChunk",
    "CountInput",
    "CountSource",
    "ReadOptions",
    "canonical_csr",
    "check_distinct_inputs",
    "count_format",
    "filter_pass_rows",
    "map_source_genes",
    "normalization_totals",
    "open_source",
    "read_anndata",
    "release_free_memory",
    "remap_columns",
    "row_sums",
    "validate_counts",
]
