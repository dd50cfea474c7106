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
for genes actually seen (or only for the genes of a given vocabulary). Counts never wrap: before an
update or merge could take a bin past 4.29 billion (the uint32 limit) the histograms are widened to
int64 (twice the memory, only for such corpora).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ArtifactError, InputDataError
from ..fileio import atomic_file, check_readable_file
from ..jit import njit
from ..readers import canonical_csr, remap_columns, validate_counts
from .table import GeneMedians

_NARROW_MAX = int(np.iinfo(np.uint32).max)  # the largest count of the narrow (uint32) histograms


@njit
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
        self._bound = 0  # no bin count exceeds this (each cell adds at most 1 to a gene's bins)
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
        """The ``(n_genes, n_bins)`` histogram (a view): uint32, or int64 once a bin could pass the uint32 limit."""
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
        grown = np.zeros((max(n_rows, 2 * self._hist.shape[0]), self.n_bins), dtype=self._hist.dtype)
        grown[: len(self._genes)] = self._hist[: len(self._genes)]
        self._hist = grown

    def _make_room(self, added: int) -> None:
        """Before ``added`` more counts may land in one bin: widen uint32 histograms to int64 if a bin could
        pass the uint32 limit (a uint32 count would wrap silently), and raise the bound on every bin by ``added``."""
        self._bound += int(added)
        if self._bound > _NARROW_MAX and self._hist.dtype != np.int64:
            self._hist = self._hist.astype(np.int64)

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
        counts = canonical_csr(counts)  # a gene stored twice in a cell is one value, their sum
        totals = np.ascontiguousarray(totals, dtype=np.float64)
        if totals.shape != (counts.shape[0],):
            raise ValueError(f"totals has shape {totals.shape}, expected ({counts.shape[0]},)")
        if np.shape(ensembl_ids) != (counts.shape[1],):  # the compiled loop reads one slot per column, unchecked
            raise InputDataError(
                f"MedianAccumulator.update: {np.shape(ensembl_ids)[0] if np.ndim(ensembl_ids) else 0:,} gene IDs for a "
                f"matrix of {counts.shape[1]:,} columns; give one Ensembl ID per column ('' to ignore a column)."
            )
        validate_counts(counts, allow_fractional=True, where="MedianAccumulator.update")  # negative / NaN: never skipped
        slots = self._slots(ensembl_ids)
        used = slots[slots >= 0]
        if len(used) != len(np.unique(used)):
            # Duplicate genes: sum their columns per cell, then each output column is one slot.
            counts = _sum_duplicate_columns(counts, slots)
            order = np.unique(used)
            slots = order
        used_cells = int(np.count_nonzero(totals > 0))  # each adds at most 1 to a gene's bins (the rest are skipped)
        self._make_room(used_cells)
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
        self.n_cells += used_cells

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
        mine = self._hist[slots[keep]].astype(np.int64) + other.histograms[keep]  # added exactly, then stored
        self._make_room(other._bound)  # wide enough for any sum (merged accumulators add counts)
        self._hist[slots[keep]] = mine
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
        """Write the accumulator as ``.npz`` (no pickles) atomically. The histograms are stored as uint32
        when every count fits (the format of earlier versions) and as int64 otherwise (earlier versions
        misread those: they cast them to uint32)."""
        path = Path(path)
        hist = self.histograms
        if hist.dtype != np.uint32 and (not hist.size or int(hist.max()) <= _NARROW_MAX):
            hist = hist.astype(np.uint32)
        with atomic_file(path, "wb") as handle:
            np.savez(
                handle,
                genes=np.array(self._genes, dtype=str),
                histograms=hist,
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
                bins_per_decade, min_value, max_value = int(settings[0]), float(settings[1]), float(settings[2])
        except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError) as exc:  # IndexError: an empty array
            raise ArtifactError(f"median accumulator {path} could not be read ({exc}); it may be truncated.") from exc
        acc = cls(genes=genes.astype(object), bins_per_decade=bins_per_decade, min_value=min_value, max_value=max_value)
        if hist.shape != (len(genes), acc.n_bins):
            raise ArtifactError(f"median accumulator {path}: histogram shape {hist.shape} does not match its settings.")
        largest = int(hist.max()) if hist.size and hist.dtype.kind in "ui" else 0
        if hist.dtype.kind not in "ui" or (hist.size and int(hist.min()) < 0) or largest > np.iinfo(np.int64).max:
            raise ArtifactError(f"median accumulator {path}: histograms of {hist.dtype} (negative, fractional or "
                                "too large counts); it was not written by MedianAccumulator.save.")
        acc._hist = hist.astype(np.uint32 if largest <= _NARROW_MAX else np.int64)  # uint32 unless a count needs more
        acc._bound = largest
        acc.fixed_genes = fixed
        acc.n_cells = n_cells
        return acc


def _sum_duplicate_columns(counts: sp.csr_matrix, slots: np.ndarray) -> sp.csr_matrix:
    """Columns → one column per distinct slot (sorted), summing columns that share a slot."""

    distinct, inverse = np.unique(slots[slots >= 0], return_inverse=True)
    column_map = np.full(len(slots), -1, dtype=np.int64)
    column_map[slots >= 0] = inverse
    return remap_columns(counts, column_map, len(distinct))

