"""Worker pools and cell-range planning shared by the median and tokenization stages."""

from __future__ import annotations

import multiprocessing


def worker_context() -> multiprocessing.context.BaseContext:
    """Process start method for worker pools: forkserver (clean, fast) where available, else spawn."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["mixgeneformer.tokenize", "datasets.arrow_writer"])
        return ctx
    return multiprocessing.get_context("spawn")


def plan_ranges(n_cells: int, workers: int, chunk_size: int, max_task_cells: int = 200_000) -> list[tuple[int, int]]:
    """Split ``n_cells`` into consecutive cell ranges, one per worker task (multiples of chunk_size)."""
    if n_cells <= 0:
        return [(0, 0)]
    per_task = max(chunk_size, min(max_task_cells, -(-n_cells // max(workers, 1))))
    per_task = -(-per_task // chunk_size) * chunk_size
    return [(lo, min(lo + per_task, n_cells)) for lo in range(0, n_cells, per_task)]
