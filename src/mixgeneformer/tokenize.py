"""Rank-value encoding of cells (SPEC §2) → a Hugging Face ``datasets`` corpus.

For every cell: value_g = count_g / n_counts × 10,000 / median_g over vocabulary genes with a
median; zeros dropped; genes sorted by value, descending (exact float64 order; exact ties broken by
token id, so the result never depends on the order of the matrix columns); truncated to the
maximum length; optionally wrapped in ``<cls>`` … ``<eos>`` (V2 style) with a species token.

The hot path (:func:`rank_value_encode`) is one compiled (numba) pass over a whole CSR chunk: per
cell, a stable LSD radix sort on the float32 bits of the values, then the rare runs of equal
float32 keys are re-ordered by the exact float64 value (ties by token id). No Python loop per cell
or gene. Output is written chunk by chunk as Arrow list arrays built from offsets, never one Python
object per cell.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from .config import from_dict, save_config, to_dict
from .errors import ConfigError, GeneIdError, InputDataError
from .fileio import (
    atomic_directory,
    check_output,
    check_readable_file,
    content_hash,
    output_lock,
    read_json,
    write_json,
    writing,
)
from .medians import GeneMedians, compute_medians
from .readers import (
    CountChunk,
    check_distinct_inputs,
    filter_pass_rows,
    map_source_genes,
    normalization_totals,
    open_source,
    remap_columns,
    row_sums,
)

__all__ = [
    "TokenizeConfig",
    "TokenizeReport",
    "add_special_tokens",
    "rank_value_encode",
    "tokenize_anndata",
    "tokenize_for_model",
    "tokenize_files",
]

logger = logging.getLogger(__name__)

CORPUS_JSON = "mixgf_corpus.json"
V2_MAX_LEN = 4096


@dataclass
class TokenizeConfig:
    """Options of rank-value tokenization (saved as ``config.yaml`` beside every corpus).

    Attributes
    ----------
    max_len
        Maximum sequence length including special tokens (V1 default 2048; V2 at most 4096).
    style
        ``"v1"``: gene tokens only (Geneformer V1). ``"v2"``: ``<cls>`` genes … ``<eos>``.
    add_species_token
        Put the species token (``<human>`` / ``<mouse>``) first (after ``<cls>`` in V2).
    totals
        ``"all"``: n_counts over all genes (obs ``n_counts`` if present; Geneformer). ``"kept"``:
        over vocabulary genes only (the authors' variant).
    medians
        ``"corpus"``: the given median table. ``"per_file"``: medians computed on each input.
    duplicate_genes
        Columns that map to the same gene: ``"sum"`` their counts (Geneformer) or ``"error"``.
    min_coverage
        Minimum fraction of an input's gene identifiers that must resolve to Ensembl IDs.
    chunk_size
        Cells per chunk (bounds memory: about 50 bytes per stored nonzero).
    task_cells
        Cells per worker task (a file is split into ranges of this size; resume granularity).
    species
        ``"auto"`` (detected per input), ``"human"`` or ``"mouse"``.
    allow_mixed_species
        Accept human and mouse Ensembl IDs within one input.
    allow_fractional
        Accept non-integer counts.
    layer, gene_column, measurement
        Where counts and gene identifiers are read (see :func:`readers.open_source`).
    filter_pass
        Honour an obs ``filter_pass`` column (keep cells with 1).
    """

    max_len: int = 2048
    style: Literal["v1", "v2"] = "v1"
    add_species_token: bool = False
    totals: Literal["all", "kept"] = "all"
    medians: Literal["corpus", "per_file"] = "corpus"
    duplicate_genes: Literal["sum", "error"] = "sum"
    min_coverage: float = 0.5
    chunk_size: int = 4096
    task_cells: int = 50_000
    species: Literal["auto", "human", "mouse"] = "auto"
    allow_mixed_species: bool = False
    allow_fractional: bool = False
    layer: str | None = None
    gene_column: str | None = None
    measurement: str = "RNA"
    filter_pass: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (
            ("style", ("v1", "v2")),
            ("totals", ("all", "kept")),
            ("medians", ("corpus", "per_file")),
            ("duplicate_genes", ("sum", "error")),
            ("species", ("auto", "human", "mouse")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"tokenize.{name}={getattr(self, name)!r} is not one of {list(allowed)}.")
        if self.style == "v2" and self.max_len > V2_MAX_LEN:
            raise ConfigError(f"tokenize.max_len={self.max_len} exceeds {V2_MAX_LEN}, the V2 maximum (special tokens included).")
        if self.max_len <= self.n_special:
            raise ConfigError(f"tokenize.max_len={self.max_len} leaves no room for genes after {self.n_special} special tokens.")
        if self.chunk_size < 1 or self.task_cells < 1:
            raise ConfigError(f"tokenize.chunk_size ({self.chunk_size}) and task_cells ({self.task_cells}) must be ≥ 1.")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ConfigError(f"tokenize.min_coverage={self.min_coverage} must be within [0, 1].")

    @property
    def n_special(self) -> int:
        """Special tokens per sequence (``<cls>``, ``<eos>``, species)."""
        return (2 if self.style == "v2" else 0) + (1 if self.add_species_token else 0)

    @property
    def max_genes(self) -> int:
        """Gene tokens kept per cell."""
        return self.max_len - self.n_special


# ------------------------------------------------------------------------------------------------
# The pure, vectorized core


@numba.njit(cache=True, nogil=True)
def _radix_pass(src_key, src_idx, dst_key, dst_idx, m, shift, count):  # pragma: no cover - numba
    """One stable LSD pass on 8 bits of uint32 keys; returns False (nothing moved) if the digit is constant."""
    count[:] = 0
    for i in range(m):
        count[(src_key[i] >> shift) & 0xFF] += 1
    for b in range(256):
        if count[b] == m:
            return False
    total = 0
    for b in range(256):
        c = count[b]
        count[b] = total
        total += c
    for i in range(m):
        d = (src_key[i] >> shift) & 0xFF
        j = count[d]
        dst_key[j] = src_key[i]
        dst_idx[j] = src_idx[i]
        count[d] = j + 1
    return True


@numba.njit(cache=True, nogil=True)
def _rank_rows(indptr, indices, data, col_token, col_median, totals, max_len, out_tokens, out_lengths):  # pragma: no cover
    """Rank-value encode every CSR row; returns the number of tokens written to ``out_tokens``.

    Per row: values in float64 with Geneformer's operation order; a stable LSD radix sort (8-bit
    digits, constant digits skipped) on the inverted float32 bits orders them descending; runs
    of equal float32 keys are then insertion-sorted by the exact float64 value, ties by token id.
    """
    n_rows = len(indptr) - 1
    width = 1
    for r in range(n_rows):
        width = max(width, indptr[r + 1] - indptr[r])
    values = np.empty(width, np.float64)
    tokens = np.empty(width, np.int32)
    key_a = np.empty(width, np.uint32)
    key_b = np.empty(width, np.uint32)
    idx_a = np.empty(width, np.int32)
    idx_b = np.empty(width, np.int32)
    value32 = np.empty(1, np.float32)
    value32_bits = value32.view(np.uint32)
    count = np.empty(256, np.int64)
    position = 0
    for r in range(n_rows):
        total = totals[r]
        m = 0
        if total > 0:
            for j in range(indptr[r], indptr[r + 1]):
                column = indices[j]
                token = col_token[column]
                x = data[j]
                if token >= 0 and x > 0:
                    value = x / total * 10000.0 / col_median[column]  # Geneformer's order of operations
                    values[m] = value
                    tokens[m] = token
                    value32[0] = value
                    key_a[m] = ~value32_bits[0]  # positive floats: bits are monotone; invert for descending
                    idx_a[m] = m
                    m += 1
        src_key, src_idx, dst_key, dst_idx = key_a, idx_a, key_b, idx_b
        for shift in (0, 8, 16, 24):
            if _radix_pass(src_key, src_idx, dst_key, dst_idx, m, shift, count):
                src_key, src_idx, dst_key, dst_idx = dst_key, dst_idx, src_key, src_idx
        i = 0
        while i < m:
            k = i + 1
            while k < m and src_key[k] == src_key[i]:
                k += 1
            for a in range(i + 1, k):  # insertion sort of a run of equal float32 keys (rare, short)
                e = src_idx[a]
                b = a - 1
                while b >= i and (
                    values[e] > values[src_idx[b]] or (values[e] == values[src_idx[b]] and tokens[e] < tokens[src_idx[b]])
                ):
                    src_idx[b + 1] = src_idx[b]
                    b -= 1
                src_idx[b + 1] = e
            i = k
        keep = min(m, max_len)
        for a in range(keep):
            out_tokens[position + a] = tokens[src_idx[a]]
        out_lengths[r] = keep
        position += keep
    return position


def rank_value_encode(
    counts: sp.csr_matrix,
    token_ids: np.ndarray,
    medians: np.ndarray,
    totals: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-value encode every cell of a CSR chunk.

    Parameters
    ----------
    counts
        Cells × genes CSR raw counts.
    token_ids
        Token id per column (``-1``: not in the vocabulary). Columns sharing a token are summed.
    medians
        Median per column (NaN or ≤ 0: column ignored).
    totals
        Per-cell normalization total; cells with total ≤ 0 get an empty sequence.
    max_len
        Gene tokens kept per cell.

    Returns
    -------
    flat_tokens : np.ndarray[int32]
        All cells' tokens concatenated (cell order kept).
    lengths : np.ndarray[int64]
        Tokens per cell (0 for cells without any expressed vocabulary gene).
    """
    counts = sp.csr_matrix(counts)
    n_rows = counts.shape[0]
    token_ids = np.asarray(token_ids, dtype=np.int64)
    medians = np.asarray(medians, dtype=np.float64)
    totals = np.asarray(totals, dtype=np.float64)
    if token_ids.shape != (counts.shape[1],) or medians.shape != (counts.shape[1],) or totals.shape != (n_rows,):
        raise ValueError("token_ids / medians must have one entry per column and totals one per row")
    usable = (token_ids >= 0) & np.isfinite(medians) & (medians > 0)
    token_ids = np.where(usable, token_ids, -1)
    mapped = token_ids[usable]
    if len(mapped) != len(np.unique(mapped)):
        distinct, inverse = np.unique(mapped, return_inverse=True)
        column_map = np.full(len(token_ids), -1, dtype=np.int64)
        column_map[usable] = inverse
        first_median = np.empty(len(distinct))
        first_median[inverse] = medians[usable]
        counts = remap_columns(counts, column_map, len(distinct))
        token_ids, medians = distinct, first_median
    if n_rows == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    flat = np.empty(counts.nnz, dtype=np.int32)
    lengths = np.empty(n_rows, dtype=np.int64)
    written = _rank_rows(
        counts.indptr, counts.indices, counts.data, token_ids.astype(np.int32),
        np.where(token_ids >= 0, medians, 1.0), totals, max_len, flat, lengths,
    )
    return flat[:written], lengths


def add_special_tokens(
    flat: np.ndarray, lengths: np.ndarray, prefix: Sequence[int] = (), suffix: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``prefix`` tokens before and ``suffix`` tokens after every sequence (vectorized)."""
    n_pre, n_suf = len(prefix), len(suffix)
    if n_pre == 0 and n_suf == 0:
        return flat, lengths
    new_lengths = lengths + n_pre + n_suf
    ends = np.cumsum(new_lengths)
    starts = ends - new_lengths
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    is_gene = np.ones(len(out), dtype=bool)
    for i, token in enumerate(prefix):
        out[starts + i] = token
        is_gene[starts + i] = False
    for i, token in enumerate(suffix):
        out[ends - n_suf + i] = token
        is_gene[ends - n_suf + i] = False
    out[is_gene] = flat
    return out, new_lengths


# ------------------------------------------------------------------------------------------------
# Chunks → Arrow tables


@dataclass
class _Columns:
    """Per-input column lookups: token id, median and vocabulary membership per matrix column."""

    token_ids: np.ndarray
    medians: np.ndarray
    kept: np.ndarray
    species: str
    coverage: str


def _column_lookup(source: Any, vocab: Any, medians: GeneMedians, config: TokenizeConfig) -> _Columns:
    mapping = map_source_genes(source, config.species, config.min_coverage, config.allow_mixed_species, vocab.gene_to_id)
    ensembl = mapping.ensembl_ids
    if config.duplicate_genes == "error":
        _check_duplicate_genes(source.name, np.asarray(source.gene_ids, dtype=object), ensembl)
    token_ids = np.asarray(vocab.encode_genes(ensembl), dtype=np.int64)
    gene_medians = medians.lookup(ensembl)
    kept = (token_ids >= 0) & np.isfinite(gene_medians)
    if not kept.any():
        raise GeneIdError(
            f"{source.name}: none of its {len(ensembl):,} genes is in the vocabulary with a median "
            f"({mapping.coverage_report()}). Wrong species, or a vocabulary/median table for another species?"
        )
    coverage = f"{mapping.coverage_report()}; {int(kept.sum()):,} columns in the vocabulary with a median"
    logger.info("%s: %s", source.name, coverage)
    return _Columns(token_ids, gene_medians, kept, mapping.species, coverage)


def _check_duplicate_genes(name: str, columns: np.ndarray, ensembl: np.ndarray) -> None:
    """GeneIdError naming the user's columns that resolve to one gene (duplicate_genes='error')."""
    mapped = pd.Series(ensembl)
    repeated = mapped.ne("") & mapped.duplicated(keep=False)
    if not repeated.any():
        return
    groups = pd.Series(columns[repeated.to_numpy()]).groupby(mapped[repeated].to_numpy(), sort=False)
    gene, names = next(iter(groups))
    shown = ", ".join(repr(str(c)) for c in names.iloc[:5])
    raise GeneIdError(
        f"{name}: {groups.ngroups:,} genes appear in several columns; e.g. columns {shown} all resolve to {gene}. "
        "Remove or rename the duplicate columns, or use duplicate_genes='sum' (CLI: --duplicate-genes sum; "
        "Geneformer sums them)."
    )


@dataclass
class TokenizeReport:
    """Counts of one tokenization run (also written to ``mixgf_corpus.json``)."""

    cells_in: int = 0
    cells_out: int = 0
    dropped_filter_pass: int = 0
    dropped_zero_counts: int = 0
    dropped_no_vocab_gene: int = 0
    tokens: int = 0
    seconds: float = 0.0
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: TokenizeReport) -> None:
        for name in ("cells_in", "cells_out", "dropped_filter_pass", "dropped_zero_counts", "dropped_no_vocab_gene", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def cells_per_second(self) -> float:
        return self.cells_in / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"{self.cells_in:,} cells in, {self.cells_out:,} out; dropped: {self.dropped_zero_counts:,} with zero counts, "
            f"{self.dropped_no_vocab_gene:,} without a vocabulary gene, {self.dropped_filter_pass:,} by filter_pass; "
            f"{self.tokens:,} tokens; {self.seconds:.1f}s ({self.cells_per_second:,.0f} cells/s)"
        )


def _encode_chunk(
    chunk: CountChunk, columns: _Columns, vocab: Any, config: TokenizeConfig, obs_columns: Sequence[str], obs_types: dict[str, pa.DataType]
) -> tuple[pa.Table, TokenizeReport]:
    report = TokenizeReport(cells_in=chunk.n_cells)
    totals = normalization_totals(chunk, config.totals, columns.kept)
    passing = filter_pass_rows(chunk) if config.filter_pass else None
    if passing is not None:
        report.dropped_filter_pass = int((~passing).sum())
        totals = np.where(passing, totals, 0.0)
    flat, lengths = rank_value_encode(chunk.counts, columns.token_ids, columns.medians, totals, config.max_genes)
    filtered = ~passing if passing is not None else np.zeros(chunk.n_cells, dtype=bool)
    zero = ~(row_sums(chunk.counts) > 0) & ~filtered
    keep = lengths > 0
    report.dropped_zero_counts = int(zero.sum())
    report.dropped_no_vocab_gene = int((~keep & ~zero & ~filtered).sum())
    if not keep.all():
        flat = flat[np.repeat(keep, lengths)]
        lengths = lengths[keep]
    prefix: list[int] = []
    suffix: list[int] = []
    if config.style == "v2":
        prefix.append(vocab.cls_id)
        suffix.append(vocab.eos_id)
    if config.add_species_token:
        prefix.append(vocab.species_token_id(columns.species))
    flat, lengths = add_special_tokens(flat, lengths, prefix, suffix)
    report.cells_out = int(len(lengths))
    report.tokens = int(len(flat))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = {
        "input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
        if offsets[-1] >= 2**31
        else pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=pa.int32())),
        "length": pa.array(lengths.astype(np.int32)),
        "species": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(lengths), np.int32)), pa.array([columns.species])).cast(pa.string()),
        "cell_index": pa.array((chunk.start + np.flatnonzero(keep)).astype(np.int64)),
    }
    obs = chunk.obs.iloc[np.flatnonzero(keep)]
    for column in obs_columns:
        arrays[column] = _obs_array(obs[column], obs_types[column])
    return pa.table(arrays), report


def _obs_array(values: pd.Series, arrow_type: pa.DataType) -> pa.Array:
    if pa.types.is_string(arrow_type):
        text = values.astype(object).where(values.notna(), None)
        return pa.array(text.map(lambda v: v if v is None else str(v)).to_numpy(dtype=object), type=pa.string())
    return pa.array(values.to_numpy(), type=arrow_type, from_pandas=True)


def _obs_arrow_types(source: Any, obs_columns: Sequence[str]) -> dict[str, pa.DataType]:
    frame = source.obs(list(obs_columns), 0, 0)
    types: dict[str, pa.DataType] = {}
    for column in obs_columns:
        dtype = frame[column].dtype
        if pd.api.types.is_bool_dtype(dtype):
            types[column] = pa.bool_()
        elif pd.api.types.is_integer_dtype(dtype):
            types[column] = pa.int64()
        elif pd.api.types.is_float_dtype(dtype):
            types[column] = pa.float64()
        else:
            types[column] = pa.string()
    return types


def _features(obs_types: dict[str, pa.DataType]) -> Any:
    import datasets

    schema = pa.schema(
        [("input_ids", pa.list_(pa.int32())), ("length", pa.int32()), ("species", pa.string()), ("cell_index", pa.int64())]
        + list(obs_types.items())
    )
    return datasets.Features.from_arrow_schema(schema)


def _check_vocab(vocab: Any, config: TokenizeConfig) -> None:
    if config.style == "v2" and (vocab.cls_id is None or vocab.eos_id is None):
        raise ConfigError(
            "style='v2' needs <cls> and <eos> tokens, which this vocabulary lacks (a Geneformer V1 vocabulary?). "
            "Use style='v1' or a vocabulary built with `mixgf vocab`."
        )
    if config.add_species_token and (vocab.species_token_id("human") is None and vocab.species_token_id("mouse") is None):
        raise ConfigError("add_species_token=True but the vocabulary has no species tokens; set it to false.")


# ------------------------------------------------------------------------------------------------
# One task: a cell range of one input → an Arrow shard


def _medians_for(item: Any, medians: GeneMedians | None, config: TokenizeConfig, vocab: Any = None) -> GeneMedians:
    if config.medians == "corpus":
        if medians is None:
            raise ConfigError("medians='corpus' needs a median table; pass medians= (CLI: --medians medians.tsv).")
        return medians
    return compute_medians(
        [item], layer=config.layer, gene_column=config.gene_column, species=config.species, totals=config.totals,
        min_coverage=config.min_coverage, allow_mixed=config.allow_mixed_species, allow_fractional=config.allow_fractional,
        measurement=config.measurement, chunk_size=config.chunk_size,
        vocabulary_ids=None if vocab is None else vocab.gene_to_id,
    )


def _iter_tables(item: Any, vocab: Any, medians: GeneMedians, config: TokenizeConfig, obs_columns: Sequence[str], obs_types: dict[str, pa.DataType], start: int = 0, stop: int | None = None):
    with open_source(item, config.layer, config.gene_column, allow_fractional=config.allow_fractional, measurement=config.measurement) as source:
        columns = _column_lookup(source, vocab, medians, config)
        extra = [c for c in ("n_counts", "filter_pass") if c in source.obs_columns and c not in obs_columns]
        if not config.filter_pass and "filter_pass" in extra:
            extra.remove("filter_pass")
        if config.totals != "all" and "n_counts" in extra:
            extra.remove("n_counts")
        source.check_obs_columns(obs_columns)
        for chunk in source.iter_chunks(config.chunk_size, obs_columns=[*obs_columns, *extra], start=start, stop=stop):
            table, report = _encode_chunk(chunk, columns, vocab, config, obs_columns, obs_types)
            yield table, report, columns


def _tokenize_task(
    item: Any, start: int, stop: int, shard_path: str, vocab: Any, medians: GeneMedians, config: TokenizeConfig,
    obs_columns: Sequence[str], obs_types: dict[str, pa.DataType],
) -> dict[str, Any]:
    """Tokenize cells [start, stop) of one input into an Arrow shard (runs in a worker process)."""
    from datasets.arrow_writer import ArrowWriter

    started = time.perf_counter()
    report = TokenizeReport()
    tmp = f"{shard_path}.tmp-{os.getpid()}"
    coverage, species = "", ""
    writer = ArrowWriter(features=_features(obs_types), path=tmp)
    finished = False
    try:
        for table, part, columns in _iter_tables(item, vocab, medians, config, obs_columns, obs_types, start, stop):
            if table.num_rows:
                writer.write_table(table)
            report.add(part)
            coverage, species = columns.coverage, columns.species
        writer.finalize()
        finished = True
    finally:
        writer.close()
        if not finished:
            Path(tmp).unlink(missing_ok=True)
    os.replace(tmp, shard_path)
    report.seconds = time.perf_counter() - started
    result = {**dataclasses.asdict(report), "coverage": coverage, "species": species, "start": start, "stop": stop}
    write_json(f"{shard_path}.json", result)  # written last: marks the shard complete
    return result


def worker_context() -> multiprocessing.context.BaseContext:
    """Process start method for worker pools: forkserver (clean, fast) where available, else spawn."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["mixgeneformer.tokenize", "datasets.arrow_writer"])
        return ctx
    return multiprocessing.get_context("spawn")


def worker_pool(workers: int) -> Any:
    """A process pool whose workers end when the process that started it dies, however it dies.

    A parent killed with SIGKILL (a scheduler, the OOM killer) runs no cleanup: without the watch,
    its workers would wait for tasks forever and keep the forkserver alive with them.
    """
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=workers, mp_context=worker_context(), initializer=exit_with_parent, initargs=(os.getpid(),)
    )


def exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Worker initializer: a daemon thread ends this process once ``parent_pid`` is gone (or a zombie)."""
    import threading

    import psutil

    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                alive = parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE  # is_running: pid not reused
            except psutil.Error:
                alive = False
            if not alive:
                os._exit(1)

    threading.Thread(target=watch, name="mixgf-parent-watch", daemon=True).start()


# ------------------------------------------------------------------------------------------------
# Public entry points


def tokenize_for_model(
    adata: Any,
    vocab: Any,
    medians: GeneMedians | None,
    config: TokenizeConfig | None = None,
    max_positions: int | None = None,
    obs_columns: Sequence[str] = (),
    **options: Any,
) -> tuple[Any, np.ndarray, TokenizeConfig]:
    """Tokenize new cells for a trained model (embedding, classification, perturbation).

    Parameters
    ----------
    adata, vocab, medians
        The cells and the model's vocabulary and gene medians (required: a model only sees cells
        normalized like its corpus).
    config
        How the model's corpus was tokenized (default :class:`TokenizeConfig`).
    max_positions
        The model's position limit; a longer ``max_len`` is clamped to it.
    obs_columns
        obs columns to carry into the corpus.
    options
        Further :class:`TokenizeConfig` fields to set (``None`` values are ignored), e.g. ``species``.

    Returns
    -------
    (corpus, rows, config)
        The in-memory corpus, the obs row of each corpus row (cells without a vocabulary gene are
        dropped) and the configuration used.
    """
    if medians is None:
        raise ConfigError(
            "tokenizing needs the gene medians the model was trained with, and the model bundle has no "
            "medians.tsv: pass medians= (a GeneMedians), or use a tokenized corpus instead."
        )
    config = config if config is not None else TokenizeConfig()
    updates = {name: value for name, value in options.items() if value is not None}
    if max_positions is not None and config.max_len > max_positions:
        updates["max_len"] = max_positions
    if updates:
        config = dataclasses.replace(config, **updates)
    corpus = tokenize_anndata(adata, vocab, medians, config, obs_columns=obs_columns)
    return corpus, np.asarray(corpus["cell_index"], dtype=np.int64), config


def tokenize_anndata(
    adata: Any, vocab: Any, medians: GeneMedians | None, config: TokenizeConfig | None = None, obs_columns: Sequence[str] = ()
) -> Any:
    """Tokenize an in-memory AnnData into an in-memory :class:`datasets.Dataset` (AnnData untouched).

    Columns: ``input_ids`` (list of int32), ``length``, ``species``, ``cell_index`` (row in ``adata``)
    and the requested ``obs_columns``. Cells without counts or vocabulary genes are dropped
    (see ``dataset.info.description`` for the counts); all cells empty → :class:`InputDataError`.
    """
    import datasets

    config = config or TokenizeConfig()
    _check_vocab(vocab, config)
    obs_columns = list(obs_columns)
    started = time.perf_counter()
    source_for_types = open_source(adata, config.layer, config.gene_column, allow_fractional=config.allow_fractional)
    source_for_types.check_obs_columns(obs_columns)
    obs_types = _obs_arrow_types(source_for_types, obs_columns)
    table_medians = _medians_for(adata, medians, config, vocab)
    tables, report = [], TokenizeReport()
    for table, part, _ in _iter_tables(adata, vocab, table_medians, config, obs_columns, obs_types):
        tables.append(table)
        report.add(part)
    report.seconds = time.perf_counter() - started
    _check_not_empty(report, "the AnnData")
    table = pa.concat_tables([t for t in tables if t.num_rows]).cast(_features(obs_types).arrow_schema)
    info = datasets.DatasetInfo(description=report.summary(), features=_features(obs_types))
    return datasets.Dataset(table, info=info)


def _check_not_empty(report: TokenizeReport, what: str) -> None:
    if report.cells_out == 0:
        raise InputDataError(
            f"{what}: no cell could be tokenized ({report.summary()}). Check that the matrix holds raw counts of "
            "genes in the vocabulary (species? gene IDs?) and that filter_pass is not 0 everywhere."
        )


def _input_fingerprint(item: Any) -> dict[str, Any]:
    path = Path(item)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def run_manifest(
    items: Sequence[str | os.PathLike], vocab_hash: str, medians_hash: str, config: TokenizeConfig, obs_columns: Sequence[str]
) -> dict[str, Any]:
    """What identifies a tokenization run; a partial folder is resumed only when this matches."""
    return {
        "vocab_hash": vocab_hash,
        "medians_hash": medians_hash,
        "config": to_dict(config),
        "obs_columns": list(obs_columns),
        "inputs": [_input_fingerprint(p) for p in items],
    }


def tokenize_files(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab: Any,
    medians: GeneMedians | None,
    config: TokenizeConfig | None = None,
    obs_columns: Sequence[str] = (),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Tokenize many files (human and mouse may be mixed) into one corpus folder.

    Each input is split into ranges of ``config.task_cells`` cells; ``workers`` processes turn the
    ranges into Arrow shards inside ``.<out>.partial/`` beside ``out_dir``. A run interrupted and
    started again with the same inputs, vocabulary, medians and config skips the finished shards.
    The corpus appears atomically: ``save_to_disk`` layout (loadable with
    ``datasets.load_from_disk``), ``config.yaml`` and ``mixgf_corpus.json`` (vocabulary and median
    hashes, per-input coverage, dropped-cell counts).

    Returns
    -------
    Path
        ``out_dir``.
    """
    config = config or TokenizeConfig()
    _check_vocab(vocab, config)
    out_dir = check_output(out_dir, paths, overwrite=overwrite)
    if not paths:
        raise InputDataError("no input files given.")
    items = [check_readable_file(p, "count matrix") for p in paths]
    check_distinct_inputs(items)
    obs_columns = list(obs_columns)
    started = time.perf_counter()

    # Plan: open every input once (fails fast on missing layers / obs columns / gene IDs).
    tasks: list[tuple[int, int, int]] = []
    obs_types: dict[str, pa.DataType] = {}
    for index, item in enumerate(items):
        with open_source(item, config.layer, config.gene_column, allow_fractional=config.allow_fractional, measurement=config.measurement) as source:
            source.check_obs_columns(obs_columns)
            map_source_genes(source, config.species, config.min_coverage, config.allow_mixed_species, vocab.gene_to_id)
            if index == 0:
                obs_types = _obs_arrow_types(source, obs_columns)
            n_cells = source.n_cells
        tasks.extend((index, lo, min(lo + config.task_cells, n_cells)) for lo in range(0, max(n_cells, 1), config.task_cells))

    if config.medians == "per_file":
        per_file = compute_medians(
            items, per_file=True, workers=workers, layer=config.layer, gene_column=config.gene_column, species=config.species,
            totals=config.totals, min_coverage=config.min_coverage, allow_mixed=config.allow_mixed_species,
            allow_fractional=config.allow_fractional, measurement=config.measurement, chunk_size=config.chunk_size,
            vocabulary_ids=vocab.gene_to_id,
        )
        medians_hash = content_hash(*[m.hash for m in per_file])
    else:
        if medians is None:
            raise ConfigError("medians='corpus' needs a median table; pass medians= (CLI: --medians medians.tsv).")
        per_file = [medians] * len(items)
        medians_hash = medians.hash

    manifest = run_manifest(items, vocab.hash, medians_hash, config, obs_columns)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    # One writer per output; the partial folder is only looked at under the lock.
    with output_lock(out_dir), writing(out_dir):
        try:
            _run_tasks(out_dir, partial, items, tasks, per_file, manifest, vocab, config, obs_columns, obs_types,
                       workers, overwrite, progress, started)
        except InputDataError:
            shutil.rmtree(partial, ignore_errors=True)  # bad data: nothing a rerun could reuse
            raise
        except BaseException:
            if not any(partial.glob("shard-*.arrow.json")):
                shutil.rmtree(partial, ignore_errors=True)  # no finished shard to resume from
            raise
    return out_dir


def _run_tasks(
    out_dir: Path, partial: Path, items: list[Path], tasks: list[tuple[int, int, int]], per_file: list[GeneMedians],
    manifest: dict[str, Any], vocab: Any, config: TokenizeConfig, obs_columns: list[str], obs_types: dict[str, pa.DataType],
    workers: int, overwrite: bool, progress: bool, started: float,
) -> None:
    """Tokenize the planned tasks into shards in ``partial`` (resuming finished ones), then assemble."""
    manifest_path = partial / "manifest.json"
    if partial.exists():
        previous = read_json(manifest_path, "partial-run manifest") if manifest_path.exists() else None
        if previous != manifest:
            logger.warning("discarding %s: it belongs to a run with other inputs or settings", partial)
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(manifest_path, manifest)

    def shard_path(task: tuple[int, int, int]) -> Path:
        return partial / f"shard-{task[0]:05d}-{task[1]:012d}.arrow"

    results: dict[tuple[int, int, int], dict[str, Any]] = {}
    todo = []
    for task in tasks:
        marker = Path(f"{shard_path(task)}.json")
        if marker.exists() and shard_path(task).exists():
            results[task] = read_json(marker, "shard report")
        else:
            todo.append(task)
    if len(results):
        logger.info("resuming: %d of %d tasks already done", len(results), len(tasks))

    from tqdm.auto import tqdm

    total_cells = sum(hi - lo for _, lo, hi in tasks)
    bar = tqdm(total=total_cells, initial=sum(hi - lo for (_, lo, hi) in results), desc="tokenize", unit="cells", disable=not progress)
    try:
        args = [(str(items[t[0]]), t[1], t[2], str(shard_path(t)), vocab, per_file[t[0]], config, obs_columns, obs_types) for t in todo]
        if workers > 1 and len(todo) > 1:
            from concurrent.futures import as_completed

            with worker_pool(workers) as pool:
                futures = {pool.submit(_tokenize_task, *a): t for a, t in zip(args, todo, strict=True)}
                for future in as_completed(futures):
                    task = futures[future]
                    results[task] = future.result()
                    bar.update(task[2] - task[1])
        else:
            for a, task in zip(args, todo, strict=True):
                results[task] = _tokenize_task(*a)
                bar.update(task[2] - task[1])
    finally:
        bar.close()

    report = TokenizeReport()
    for task in tasks:
        report.add(TokenizeReport(**{k: v for k, v in results[task].items() if k in TokenizeReport.__dataclass_fields__ and k not in ("inputs", "seconds")}))
    report.seconds = time.perf_counter() - started
    for index, item in enumerate(items):
        mine = [results[t] for t in tasks if t[0] == index]
        report.inputs.append({
            "path": str(item),
            "species": mine[0]["species"],
            "coverage": mine[0]["coverage"],
            "cells_in": sum(r["cells_in"] for r in mine),
            "cells_out": sum(r["cells_out"] for r in mine),
            "dropped_zero_counts": sum(r["dropped_zero_counts"] for r in mine),
            "dropped_no_vocab_gene": sum(r["dropped_no_vocab_gene"] for r in mine),
            "dropped_filter_pass": sum(r["dropped_filter_pass"] for r in mine),
        })
    _check_not_empty(report, ", ".join(map(str, items)))
    _assemble_corpus(out_dir, [shard_path(t) for t in tasks if results[t]["cells_out"] > 0], obs_types, config, manifest, report, overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("tokenize: %s", report.summary())


def _assemble_corpus(
    out_dir: Path, shards: list[Path], obs_types: dict[str, pa.DataType], config: TokenizeConfig,
    manifest: dict[str, Any], report: TokenizeReport, overwrite: bool,
) -> None:
    """Write the ``save_to_disk`` layout from finished shards without copying their data."""
    import json

    import datasets

    features = _features(obs_types)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
        for shard, name in zip(shards, names, strict=True):
            try:
                os.link(shard, tmp / name)  # the partial folder is removed only after success
            except OSError:
                shutil.copyfile(shard, tmp / name)
        state = {
            "_data_files": [{"filename": n} for n in names],
            "_fingerprint": content_hash(json.dumps(manifest, sort_keys=True)),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        with open(tmp / "state.json", "w") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
        info = dataclasses.asdict(datasets.DatasetInfo(description=report.summary(), features=features))
        info["features"] = features.to_dict()
        with open(tmp / "dataset_info.json", "w") as handle:
            json.dump({k: info[k] for k in sorted(info)}, handle, indent=2, default=str)
        save_config(config, tmp)
        write_json(tmp / CORPUS_JSON, {
            "format": "mixgeneformer-corpus-v1",
            "vocab_hash": manifest["vocab_hash"],
            "medians_hash": manifest["medians_hash"],
            "obs_columns": manifest["obs_columns"],
            **{k: v for k, v in dataclasses.asdict(report).items()},
        })
        # Verify the folder loads before it becomes visible.
        loaded = datasets.load_from_disk(str(tmp))
        if len(loaded) != report.cells_out:
            raise InputDataError(f"corpus check failed: {len(loaded)} rows written, {report.cells_out} expected.")
        del loaded


def load_tokenize_config(data: dict[str, Any] | None) -> TokenizeConfig:
    """Strictly validated :class:`TokenizeConfig` from a mapping (unknown keys / wrong types rejected)."""
    return from_dict(TokenizeConfig, data, "tokenize")

