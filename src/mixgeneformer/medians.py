"""Per-gene medians of nonzero normalized expression, computed by streaming and mergeable.

Rank-value encoding divides each gene's normalized count (count / cell total × 10,000) by the
gene's median over the whole corpus of its *nonzero* normalized values (SPEC §2). A corpus of
millions of cells does not fit in memory, so :class:`MedianAccumulator` keeps, per gene, a
histogram of those values on fixed log-spaced bins; histograms add up, so accumulators built on
different files or workers merge exactly. :meth:`MedianAccumulator.finalize` interpolates inside
the bin that holds the median.

Accuracy bound
--------------
Bins are log-spaced with ``bins_per_decade`` bins per decade, so every bin ``[lo, hi)`` has
``hi / lo = r = 10 ** (1 / bins_per_decade)``. The median is the value of the middle order
statistic (the mean of the two middle ones for an even count); each order statistic is estimated
inside the bin that holds it (geometric interpolation by its rank within the bin), so each estimate
is within a factor ``r`` of the true value and the relative error of the median is at most
``r - 1`` (1.16 % for the default 200 bins per decade; :attr:`MedianAccumulator.relative_error_bound`).
Values outside ``[min_value, max_value)`` are clamped into the first / last bin, where the bound no
longer holds; the defaults (1e-3 … 1e4 on the count-per-10k scale) contain every value of an
integer count in a cell with fewer than 10 million counts.

Memory is ``n_genes × n_bins × 4`` bytes (uint32 counts): 5.6 kB per gene with the defaults, only
for genes actually seen (or only for the genes of a given vocabulary).

:class:`GeneMedians` is the finished table: Ensembl ID → median, saved as a TSV with a content
hash that corpora and models record.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from .errors import ArtifactError, InputDataError
from .fileio import atomic_file, check_readable_file, content_hash, read_text
from .parallel import plan_ranges, worker_pool
from .readers import (
    ReadOptions,
    check_distinct_inputs,
    filter_pass_rows,
    normalization_totals,
    remap_columns,
)

__all__ = ["GeneMedians", "MedianAccumulator", "MedianRunStats", "accumulate_medians", "compute_medians"]

logger = logging.getLogger(__name__)

_TSV_HEADER = "ensembl_id\tmedian"


class GeneMedians:
    """Ensembl ID → median of the gene's nonzero normalized values (count / total × 10,000).

    Parameters
    ----------
    values
        Mapping of unversioned upper-case Ensembl IDs to positive finite medians.
    """

    def __init__(self, values: Mapping[str, float]):
        ids = np.array(list(values.keys()), dtype=object)
        meds = np.array([float(v) for v in values.values()], dtype=np.float64)
        bad = ~np.isfinite(meds) | (meds <= 0)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InputDataError(
                f"gene median for {ids[first]!r} is {meds[first]!r}; medians must be positive finite "
                f"numbers ({int(bad.sum())} invalid). Recompute the medians with `mixgf medians`."
            )
        order = np.argsort(ids.astype(str), kind="stable") if len(ids) else np.array([], dtype=np.int64)
        self._ids = ids[order].astype(str)
        self._medians = meds[order]
        self._index = pd.Index(self._ids)
        self.values: dict[str, float] = dict(zip(self._ids.tolist(), self._medians.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, ensembl_id: object) -> bool:
        return ensembl_id in self.values

    def __repr__(self) -> str:
        return f"GeneMedians({len(self)} genes, hash={self.hash})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneMedians) and self.values == other.values

    @property
    def hash(self) -> str:
        """Content hash over the sorted (ID, median) pairs; exact float64 values (hex) are hashed."""
        return content_hash(
            "gene-medians-v1",
            "\n".join(f"{g}\t{float(m).hex()}" for g, m in zip(self._ids, self._medians, strict=True)),
        )

    def lookup(self, ensembl_ids: np.ndarray | Iterable[str]) -> np.ndarray:
        """Medians aligned with ``ensembl_ids`` (float64), NaN where a gene has no median."""
        ids = np.asarray(ensembl_ids, dtype=object)
        out = np.full(ids.shape[0], np.nan, dtype=np.float64)
        if len(self._ids) == 0 or ids.shape[0] == 0:
            return out
        pos = self._index.get_indexer(pd.Index(ids.astype(str)))
        hit = pos >= 0
        out[hit] = self._medians[pos[hit]]
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write a two-column TSV (``ensembl_id``, ``median``) atomically; floats round-trip exactly."""
        path = Path(path)
        with atomic_file(path) as handle:
            handle.write(_TSV_HEADER + "\n")
            for g, m in zip(self._ids, self._medians, strict=True):
                handle.write(f"{g}\t{float(m)!r}\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneMedians:
        """Read a TSV written by :meth:`save` (clear errors for missing / truncated / wrong files)."""
        path, text = read_text(path, "gene median table", "a gene median TSV (written by `mixgf medians`)")
        with io.StringIO(text) as handle:
            header = handle.readline().rstrip("\n")
            if header != _TSV_HEADER:
                raise ArtifactError(
                    f"gene median table {path} must start with the header {_TSV_HEADER!r}, found "
                    f"{header[:80]!r}. Create it with `mixgf medians` or GeneMedians.save()."
                )
            values: dict[str, float] = {}
            first_line: dict[str, int] = {}
            for lineno, line in enumerate(handle, start=2):
                line = line.rstrip("\n")
                if not line:
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    raise ArtifactError(
                        f"gene median table {path}, line {lineno}: expected 2 tab-separated fields, "
                        f"got {len(parts)} ({line[:80]!r}); the file may be truncated or corrupt."
                    )
                if parts[0] in first_line:
                    raise ArtifactError(
                        f"gene median table {path} lists gene {parts[0]} twice (lines {first_line[parts[0]]} and {lineno}); "
                        "a gene has one median. Remove the repeated line, or recompute the table with `mixgf medians`."
                    )
                first_line[parts[0]] = lineno
                try:
                    values[parts[0]] = float(parts[1])
                except ValueError as exc:
                    raise ArtifactError(
                        f"gene median table {path}, line {lineno}: median {parts[1]!r} is not a number."
                    ) from exc
        if not values:
            raise ArtifactError(f"gene median table {path} holds no genes; recompute it with `mixgf medians`.")
        return cls(values)

    def to_series(self) -> pd.Series:
        """The table as a pandas Series indexed by Ensembl ID."""
        return pd.Series(self._medians.copy(), index=pd.Index(self._ids.copy(), name="ensembl_id"), name="median")


@numba.njit(cache=True, nogil=True)
def _histogram_update(hist, data, indices, indptr, totals, column_slot, log_min, bins_per_decade):  # pragma: no cover - numba
    """hist[slot, bin(value)] += 1 for every stored nonzero; value = count / total × 10,000.

    A compiled loop instead of ``np.bincount``: bincount needs an int64 scratch array of
    ``n_genes × n_bins`` per chunk (hundreds of MB), this needs none.
    """
    n_bins = hist.shape[1]
    for row in range(indptr.shape[0] - 1):
        total = totals[row]
        if not total > 0:
            continue
        scale = 10000.0 / total
        for k in range(indptr[row], indptr[row + 1]):
            slot = column_slot[indices[k]]
            value = data[k]
            if slot < 0 or not value > 0:
                continue
            b = int(math.floor((math.log10(value * scale) - log_min) * bins_per_decade))
            if b < 0:
                b = 0
            elif b >= n_bins:
                b = n_bins - 1
            hist[slot, b] += 1


class MedianAccumulator:
    """Mergeable per-gene histograms of nonzero normalized values on fixed log-spaced bins.

    Parameters
    ----------
    genes
        Restrict to these Ensembl IDs (e.g. a vocabulary's genes); ``None`` tracks every gene seen.
    bins_per_decade
        Bin resolution; the relative error of a median is at most ``10 ** (1 / bins_per_decade) - 1``.
    min_value, max_value
        Range of normalized values (count per 10,000) covered by bins; values outside are clamped.
    """

    def __init__(
        self,
        genes: Sequence[str] | np.ndarray | None = None,
        bins_per_decade: int = 200,
        min_value: float = 1e-3,
        max_value: float = 1e4,
    ):
        if bins_per_decade < 1 or not (0 < min_value < max_value):
            raise InputDataError(
                f"invalid histogram settings bins_per_decade={bins_per_decade}, min_value={min_value}, "
                f"max_value={max_value}: need bins_per_decade ≥ 1 and 0 < min_value < max_value."
            )
        self.bins_per_decade = int(bins_per_decade)
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        # +1: the top edge is exactly max_value and a value equal to it (count == total) gets its own bin.
        self.n_bins = int(math.ceil(round(math.log10(max_value / min_value) * bins_per_decade, 9))) + 1
        self.fixed_genes = genes is not None
        ids = np.array([] if genes is None else list(genes), dtype=object).astype(str)
        if len(set(ids.tolist())) != len(ids):
            raise InputDataError("MedianAccumulator genes must be unique Ensembl IDs.")
        self._genes: list[str] = ids.tolist()
        self._index = pd.Index(ids)
        self._hist = np.zeros((len(ids) if genes is not None else 1024, self.n_bins), dtype=np.uint32)
        self.n_cells = 0

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def bin_edges(self) -> np.ndarray:
        """Lower edges of the bins (float64, ``n_bins``); bin ``b`` spans ``[edge[b], edge[b] * r)``."""
        return self.min_value * np.power(10.0, np.arange(self.n_bins) / self.bins_per_decade)

    @property
    def relative_error_bound(self) -> float:
        """Worst-case relative error of a finalized median (for values inside the bin range)."""
        return 10.0 ** (1.0 / self.bins_per_decade) - 1.0

    @property
    def genes(self) -> np.ndarray:
        """Tracked Ensembl IDs, aligned with the histogram rows."""
        return np.array(self._genes, dtype=object)

    @property
    def histograms(self) -> np.ndarray:
        """The ``(n_genes, n_bins)`` uint32 histogram (a view)."""
        return self._hist[: len(self._genes)]

    def __len__(self) -> int:
        return len(self._genes)

    def nbytes(self) -> int:
        """Memory held by the histograms."""
        return int(self._hist.nbytes)

    # -- updating ---------------------------------------------------------------------------------
    def _slots(self, ensembl_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ensembl_ids, dtype=object).astype(str)
        slots = self._index.get_indexer(ids) if len(self._genes) else np.full(len(ids), -1, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        if not self.fixed_genes:
            new = (slots < 0) & (ids != "")
            if new.any():
                fresh = pd.unique(ids[new])
                self._grow(len(self._genes) + len(fresh))
                self._genes.extend(fresh.tolist())
                self._index = pd.Index(np.array(self._genes, dtype=object).astype(str))
                slots = np.asarray(self._index.get_indexer(ids), dtype=np.int64)
        slots[ids == ""] = -1
        return slots

    def _grow(self, n_rows: int) -> None:
        if n_rows <= self._hist.shape[0]:
            return
        grown = np.zeros((max(n_rows, 2 * self._hist.shape[0]), self.n_bins), dtype=np.uint32)
        grown[: len(self._genes)] = self._hist[: len(self._genes)]
        self._hist = grown

    def update(self, counts: sp.csr_matrix, ensembl_ids: np.ndarray, totals: np.ndarray) -> None:
        """Add the nonzero normalized values of a whole CSR chunk.

        Parameters
        ----------
        counts
            Cells × genes CSR chunk of raw counts.
        ensembl_ids
            One Ensembl ID per column (``""`` = ignore the column). Columns sharing an ID are summed
            per cell first (duplicate genes, Geneformer behaviour).
        totals
            Per-cell normalization totals; cells with total ≤ 0 (or NaN) are skipped, so a caller
            excludes cells by setting their total to 0.
        """
        counts = sp.csr_matrix(counts)
        totals = np.ascontiguousarray(totals, dtype=np.float64)
        if totals.shape != (counts.shape[0],):
            raise ValueError(f"totals has shape {totals.shape}, expected ({counts.shape[0]},)")
        slots = self._slots(ensembl_ids)
        used = slots[slots >= 0]
        if len(used) != len(np.unique(used)):
            # Duplicate genes: sum their columns per cell, then each output column is one slot.
            counts = _sum_duplicate_columns(counts, slots)
            order = np.unique(used)
            slots = order
        _histogram_update(
            self._hist,
            counts.data,
            counts.indices,
            counts.indptr,
            totals,
            slots,
            math.log10(self.min_value),
            float(self.bins_per_decade),
        )
        self.n_cells += int(np.count_nonzero(totals > 0))

    def merge(self, other: MedianAccumulator) -> MedianAccumulator:
        """Add ``other``'s histograms into this one (in place; returns ``self``)."""
        if (other.bins_per_decade, other.min_value, other.max_value) != (self.bins_per_decade, self.min_value, self.max_value):
            raise InputDataError(
                "cannot merge median accumulators with different bins "
                f"({other.bins_per_decade}/{other.min_value}/{other.max_value} vs "
                f"{self.bins_per_decade}/{self.min_value}/{self.max_value}); build both with the same settings."
            )
        slots = self._slots(other.genes)
        keep = slots >= 0
        mine = self._hist[slots[keep]].astype(np.uint64) + other.histograms[keep]
        if mine.size and int(mine.max()) > np.iinfo(np.uint32).max:
            raise InputDataError("median histogram counts overflow uint32 (more than 4.29 billion cells per bin).")
        self._hist[slots[keep]] = mine.astype(np.uint32)
        self.n_cells += other.n_cells
        return self

    # -- results ----------------------------------------------------------------------------------
    def finalize(self, min_cells: int = 1) -> GeneMedians:
        """Medians of every gene seen in at least ``min_cells`` cells (vectorized over genes)."""
        hist = self.histograms
        genes = self.genes
        lower_edges = self.bin_edges
        ratio = 10.0 ** (1.0 / self.bins_per_decade)
        medians = np.full(len(genes), np.nan)
        block = 2048  # genes per block: bounds the cumulative-sum temporary
        for lo in range(0, len(genes), block):
            h = hist[lo : lo + block].astype(np.int64)
            cum = np.cumsum(h, axis=1)
            n = cum[:, -1]
            has = n >= max(min_cells, 1)
            k_low = (n + 1) // 2  # 1-based ranks of the middle order statistics
            k_high = n // 2 + 1
            k_high = np.where(n % 2 == 1, k_low, k_high)
            est = [self._order_statistic(h, cum, k, lower_edges, ratio) for k in (k_low, k_high)]
            medians[lo : lo + block] = np.where(has, 0.5 * (est[0] + est[1]), np.nan)
        keep = np.isfinite(medians)
        return GeneMedians(dict(zip(genes[keep].tolist(), medians[keep].tolist(), strict=True)))

    @staticmethod
    def _order_statistic(h: np.ndarray, cum: np.ndarray, k: np.ndarray, lower_edges: np.ndarray, ratio: float) -> np.ndarray:
        rows = np.arange(h.shape[0])
        kk = np.maximum(k, 1)
        b = np.minimum((cum < kk[:, None]).sum(axis=1), h.shape[1] - 1)  # first bin with cum >= k
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
        in_bin = np.maximum(h[rows, b], 1)
        position = (kk - before - 0.5) / in_bin  # rank inside the bin, in (0, 1)
        return lower_edges[b] * np.power(ratio, position)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the accumulator as ``.npz`` (no pickles) atomically."""
        path = Path(path)
        with atomic_file(path, "wb") as handle:
            np.savez(
                handle,
                genes=np.array(self._genes, dtype=str),
                histograms=self.histograms,
                settings=np.array([self.bins_per_decade, self.min_value, self.max_value], dtype=np.float64),
                n_cells=np.array([self.n_cells], dtype=np.int64),
                fixed_genes=np.array([self.fixed_genes]),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MedianAccumulator:
        """Read an accumulator written by :meth:`save` (``allow_pickle=False``)."""
        path = check_readable_file(path, "median accumulator")
        try:
            with np.load(path, allow_pickle=False) as z:
                genes, hist, settings = z["genes"], z["histograms"], z["settings"]
                n_cells, fixed = int(z["n_cells"][0]), bool(z["fixed_genes"][0])
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"median accumulator {path} could not be read ({exc}); it may be truncated.") from exc
        acc = cls(genes=genes.astype(object), bins_per_decade=int(settings[0]), min_value=float(settings[1]), max_value=float(settings[2]))
        if hist.shape != (len(genes), acc.n_bins):
            raise ArtifactError(f"median accumulator {path}: histogram shape {hist.shape} does not match its settings.")
        acc._hist[:] = hist
        acc.fixed_genes = fixed
        acc.n_cells = n_cells
        return acc


def _sum_duplicate_columns(counts: sp.csr_matrix, slots: np.ndarray) -> sp.csr_matrix:
    """Columns → one column per distinct slot (sorted), summing columns that share a slot."""

    distinct, inverse = np.unique(slots[slots >= 0], return_inverse=True)
    column_map = np.full(len(slots), -1, dtype=np.int64)
    column_map[slots >= 0] = inverse
    return remap_columns(counts, column_map, len(distinct))


# ------------------------------------------------------------------------------------------------
# Streaming over many inputs


@dataclass
class MedianRunStats:
    """What a median run read: per input, cells read / used and the gene coverage line."""

    inputs: list[str]
    cells_read: list[int]
    cells_used: list[int]
    coverage: list[str]
    species: list[str]
    seconds: float = 0.0

    @property
    def total_cells(self) -> int:
        return int(sum(self.cells_read))


def _input_name(item: Any) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"AnnData[{getattr(item, 'n_obs', '?')} cells]"


def _accumulate_range(
    item: Any, start: int, stop: int | None, genes: np.ndarray | None, options: ReadOptions, bins_per_decade: int,
    vocabulary_ids: frozenset[str] | None = None,
) -> tuple[MedianAccumulator, int, int, str, str]:
    """Median histograms of cells [start, stop) of one input (runs in a worker process)."""
    accumulator = MedianAccumulator(genes=genes, bins_per_decade=bins_per_decade)
    with options.open(item) as source:
        known = vocabulary_ids if genes is None else genes
        mapping = options.map_genes(source, known)
        ensembl = mapping.ensembl_ids
        kept = (accumulator._slots(ensembl) >= 0) if genes is not None else ensembl != ""
        extra = [c for c in ("n_counts", "filter_pass") if c in source.obs_columns]
        read = used = 0
        for chunk in source.iter_chunks(options.chunk_size, obs_columns=extra, start=start, stop=stop):
            totals = normalization_totals(chunk, options.totals, kept)
            passing = filter_pass_rows(chunk)
            if passing is not None:
                totals = np.where(passing, totals, 0.0)
            accumulator.update(chunk.counts, ensembl, totals)
            read += chunk.n_cells
            used += int(np.count_nonzero(totals > 0))
        return accumulator, read, used, mapping.coverage_report(), mapping.species


def _read_options(read: ReadOptions | None, overrides: dict[str, Any]) -> ReadOptions:
    """``read`` (default :class:`ReadOptions`) with field overrides given as keywords."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ReadOptions)})
    if unknown:
        raise TypeError(f"unknown medians option(s) {unknown}; reader options are the fields of ReadOptions.")
    return dataclasses.replace(read or ReadOptions(), **overrides)


# long: plan the tasks, then merge parts as they arrive (in process or from a pool); 50 lines of body.
def accumulate_medians(
    inputs: Sequence[Any],
    *,
    read: ReadOptions | None = None,
    genes: Sequence[str] | None = None,
    bins_per_decade: int = 200,
    workers: int = 1,
    progress: bool = False,
    vocabulary_ids: Iterable[str] | None = None,
    **read_options: Any,
) -> tuple[list[MedianAccumulator], MedianRunStats]:
    """One :class:`MedianAccumulator` per input, streaming every input in chunks.

    Files are split into cell ranges and processed by ``workers`` processes; in-memory AnnData
    inputs are processed in this process. See :func:`compute_medians` for the parameters.
    """
    options = _read_options(read, read_options)
    if options.totals not in ("all", "kept"):
        raise InputDataError(f"totals must be 'all' or 'kept', got {options.totals!r}.")
    if not inputs:
        raise InputDataError("no inputs given: pass at least one .h5ad / .loom / 10x / SOMA path or AnnData.")
    check_distinct_inputs(inputs)
    known = None if vocabulary_ids is None else frozenset(vocabulary_ids)
    gene_array = None if genes is None else np.asarray(list(genes), dtype=object)
    started = time.perf_counter()
    tasks: list[tuple[int, Any, int, int | None]] = []
    for i, item in enumerate(inputs):
        if workers > 1 and isinstance(item, (str, os.PathLike)):
            with options.open(item) as source:
                n_cells = source.n_cells
            tasks.extend((i, item, lo, hi) for lo, hi in plan_ranges(n_cells, workers, options.chunk_size))
        else:
            tasks.append((i, item, 0, None))
    # Each part is merged as soon as it arrives, so memory holds one accumulator per input (plus
    # the parts in flight), however many cell ranges a corpus is split into.
    merged: list[MedianAccumulator | None] = [None] * len(inputs)
    stats = MedianRunStats([_input_name(x) for x in inputs], [0] * len(inputs), [0] * len(inputs), [""] * len(inputs), [""] * len(inputs))

    def collect(i: int, part: tuple[MedianAccumulator, int, int, str, str]) -> None:
        accumulator, cells_read, cells_used, coverage, species = part
        if merged[i] is None:
            merged[i] = accumulator
            stats.coverage[i], stats.species[i] = coverage, species
        else:
            merged[i].merge(accumulator)
        stats.cells_read[i] += cells_read
        stats.cells_used[i] += cells_used
        bar.update()

    bar = tqdm(total=len(tasks), desc="medians", unit="task", disable=not progress)
    try:
        if workers > 1 and len(tasks) > 1:
            local = [t for t in tasks if not isinstance(t[1], (str, os.PathLike))]
            remote = [t for t in tasks if isinstance(t[1], (str, os.PathLike))]
            with worker_pool(workers) as pool:
                futures = {pool.submit(_accumulate_range, t[1], t[2], t[3], gene_array, options, bins_per_decade, known): t[0] for t in remote}
                for i, item, lo, hi in local:
                    collect(i, _accumulate_range(item, lo, hi, gene_array, options, bins_per_decade, known))
                for future in as_completed(futures):
                    collect(futures[future], future.result())
        else:
            for i, item, lo, hi in tasks:
                collect(i, _accumulate_range(item, lo, hi, gene_array, options, bins_per_decade, known))
    finally:
        bar.close()
    accumulators = list(merged)
    stats.seconds = time.perf_counter() - started
    return accumulators, stats


def compute_medians(
    inputs: Sequence[Any] | Any,
    *,
    per_file: bool = False,
    workers: int = 1,
    min_cells: int = 1,
    return_stats: bool = False,
    **options: Any,
) -> Any:
    """Per-gene medians of nonzero normalized values (count / cell total × 10,000), streamed.

    Parameters
    ----------
    inputs
        Paths (``.h5ad``, ``.loom``, 10x ``.h5`` / mtx folder, SOMA) and/or AnnData objects; human and
        mouse inputs can be mixed (genes are keyed by Ensembl ID).
    per_file
        Return one :class:`GeneMedians` per input (the authors' variant) instead of one for the corpus.
    workers
        Worker processes (files are split into cell ranges).
    min_cells
        Keep genes detected in at least this many cells.
    return_stats
        Also return a :class:`MedianRunStats`.
    **options
        Passed to :func:`accumulate_medians`: ``read`` (a :class:`~mixgeneformer.readers.ReadOptions`),
        ``genes`` (restrict to these Ensembl IDs), ``bins_per_decade``, ``progress``, and any
        ReadOptions field as a keyword overriding ``read`` (``layer``, ``gene_column``, ``species``,
        ``totals`` ("all" | "kept"), ``min_coverage``, ``allow_mixed_species``, ``allow_fractional``,
        ``measurement``, ``chunk_size``),
        ``vocabulary_ids`` (Ensembl IDs kept even where the shipped gene table lacks them; ``genes``
        implies them).

    Returns
    -------
    GeneMedians or list[GeneMedians] (and MedianRunStats when ``return_stats``)
    """
    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    accumulators, stats = accumulate_medians(inputs, workers=workers, **options)
    if per_file:
        result: Any = [acc.finalize(min_cells) for acc in accumulators]
        for name, medians in zip(stats.inputs, result, strict=True):
            if len(medians) == 0:
                raise InputDataError(f"{name}: no gene has a nonzero count; cannot compute medians.")
    else:
        total = accumulators[0]
        for acc in accumulators[1:]:
            total.merge(acc)
        result = total.finalize(min_cells)
        if len(result) == 0:
            raise InputDataError("no gene has a nonzero count in the inputs; cannot compute medians.")
    logger.info("medians: %d cells from %d input(s) in %.1fs", stats.total_cells, len(inputs), stats.seconds)
    return (result, stats) if return_stats else result
