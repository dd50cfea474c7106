"""Worker pools and cell-range planning shared by the median and tokenization stages."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import psutil

from .errors import ConfigError


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
    if chunk_size < 1:  # else a division by zero before any cell is read
        raise ConfigError(f"chunk_size must be at least 1 cell, got {chunk_size}; give a positive --chunk-size (e.g. 4096).")
    if n_cells <= 0:
        return [(0, 0)]
    per_task = max(chunk_size, min(max_task_cells, -(-n_cells // max(workers, 1))))
    per_task = -(-per_task // chunk_size) * chunk_size
    return [(lo, min(lo + per_task, n_cells)) for lo in range(0, n_cells, per_task)]


class _WorkerPool(ProcessPoolExecutor):
    """A process pool whose ``with`` block, left by an exception (a failed task, a signal), cancels the
    queued tasks instead of running every one of them before the error is reported."""

    def __exit__(self, exc_type, exc_val, exc_tb):  # noqa: ANN001
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers end when the process that started it dies, however it dies, and
    whose queued tasks are cancelled when its ``with`` block ends in an exception.

    A parent killed with SIGKILL (a scheduler, the OOM killer) runs no cleanup: without the watch,
    its workers would wait for tasks forever and keep the forkserver alive with them.
    """
    return _WorkerPool(
        max_workers=workers, mp_context=worker_context(), initializer=exit_with_parent, initargs=(os.getpid(),)
    )


def exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Worker initializer: a daemon thread ends this process once ``parent_pid`` is gone (or a zombie)."""
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
