"""Streaming many inputs (files split into cell ranges over worker processes) into median tables."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import ConfigError, GeneIdError, InputDataError, check_config, species_for_every_input
from ..parallel import plan_ranges, worker_pool
from ..readers import (
    CountInput,
    ReadOptions,
    check_distinct_inputs,
    filter_pass_rows,
    normalization_totals,
)
from .histogram import MedianAccumulator
from .table import GeneMedians

logger = logging.getLogger(__name__)


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


def _input_name(item: CountInput) -> str:
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
        kept = None
        if options.totals == "kept":  # the vocabulary's genes, as in the tokenizer's totals (checked given)
            kept = accumulator._slots(ensembl) >= 0 if genes is not None else pd.Index(ensembl).isin(list(vocabulary_ids or ()))
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
    check_config(read, ReadOptions, "read")
    fields = [f.name for f in dataclasses.fields(ReadOptions)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown medians option(s) {unknown}: the options are read, genes, bins_per_decade, workers, "
                          f"progress, vocabulary_ids, min_cells and the fields of ReadOptions ({', '.join(fields)}).")
    return dataclasses.replace(read or ReadOptions(), **overrides)


# long: plan the tasks, then merge parts as they arrive (in process or from a pool); 50 lines of body.
def accumulate_medians(
    inputs: Sequence[CountInput],
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
    if options.totals == "kept" and genes is None and vocabulary_ids is None:
        raise ConfigError("totals='kept' divides each count by the cell's total over the vocabulary's genes, and no "
                          "vocabulary was given: pass --vocab VOCAB.json (API: genes= or vocabulary_ids=), or use totals='all'.")
    if not inputs:
        raise InputDataError("no inputs given: pass at least one .h5ad / .loom / 10x / SOMA path or AnnData.")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}.")
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
    except GeneIdError as error:  # an input's genes read with the species given for every input
        raise species_for_every_input(error, len(inputs), options.species) from error
    finally:
        bar.close()
    accumulators = list(merged)
    stats.seconds = time.perf_counter() - started
    return accumulators, stats


def compute_medians(
    inputs: Sequence[CountInput] | CountInput,
    *,
    workers: int = 1,
    min_cells: int = 1,
    **options: Any,
) -> GeneMedians:
    """Per-gene medians of nonzero normalized values (count / cell total × 10,000) over all inputs, streamed.

    Parameters
    ----------
    inputs
        Paths (``.h5ad``, ``.loom``, 10x ``.h5`` / mtx folder, SOMA) and/or AnnData objects; human and
        mouse inputs can be mixed (genes are keyed by Ensembl ID).
    workers
        Worker processes (files are split into cell ranges).
    min_cells
        Keep genes detected in at least this many cells.
    **options
        Passed to :func:`accumulate_medians`: ``read`` (a :class:`~mixgeneformer.readers.ReadOptions`),
        ``genes`` (restrict to these Ensembl IDs), ``bins_per_decade``, ``progress``, and any
        ReadOptions field as a keyword overriding ``read`` (``layer``, ``gene_column``, ``species``,
        ``totals`` ("all" | "kept": the vocabulary's genes, so ``genes`` or ``vocabulary_ids`` is
        required), ``min_coverage``, ``allow_mixed_species``, ``allow_fractional``,
        ``measurement``, ``chunk_size``),
        ``vocabulary_ids`` (Ensembl IDs kept even where the shipped gene table lacks them; ``genes``
        implies them).

    Returns
    -------
    GeneMedians
        Its :attr:`~GeneMedians.stats` holds the :class:`MedianRunStats` of this run.
    """
    accumulators, stats = accumulate_medians(_as_list(inputs), workers=workers, **options)
    total = accumulators[0]
    for acc in accumulators[1:]:
        total.merge(acc)
    result = total.finalize(min_cells)
    if len(result) == 0:
        raise InputDataError(_no_medians("the inputs", sum(stats.cells_read), sum(stats.cells_used)))
    return _with_stats([result], stats)[0]


def compute_file_medians(
    inputs: Sequence[CountInput] | CountInput,
    *,
    workers: int = 1,
    min_cells: int = 1,
    **options: Any,
) -> list[GeneMedians]:
    """One :class:`GeneMedians` per input (the authors' per-file variant); options as :func:`compute_medians`.

    Each table's :attr:`~GeneMedians.stats` holds the :class:`MedianRunStats` of the whole run.
    """
    accumulators, stats = accumulate_medians(_as_list(inputs), workers=workers, **options)
    result = [acc.finalize(min_cells) for acc in accumulators]
    for name, medians, read, used in zip(stats.inputs, result, stats.cells_read, stats.cells_used, strict=True):
        if len(medians) == 0:
            raise InputDataError(_no_medians(name, read, used))
    return _with_stats(result, stats)


def _no_medians(name: str, cells_read: int, cells_used: int) -> str:
    """Why ``name`` gave no median: no cell was used (filtered out, zero totals), or no gene has a count."""
    if cells_read and not cells_used:
        return (f"{name}: none of the {cells_read:,} cells read was used: each has obs filter_pass != 1 or a total count "
                "of 0, so no median can be computed. Check the filter_pass column (1 = keep) or the counts read (layer).")
    return f"{name}: no gene has a nonzero count ({cells_read:,} cells read); cannot compute medians."


def _as_list(inputs: Sequence[CountInput] | CountInput) -> list[CountInput]:
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _with_stats(tables: list[GeneMedians], stats: MedianRunStats) -> list[GeneMedians]:
    for table in tables:
        table.stats = stats
    logger.info("medians: %d cells from %d input(s) in %.1fs", stats.total_cells, len(stats.inputs), stats.seconds)
    return tables

