"""Worker pools and cell-range planning shared by the median and tokenization stages; the device of each
process of a ``torchrun`` / ``accelerate launch`` (:func:`rank_device`, torch imported only there)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import psutil

from .errors import ConfigError

if TYPE_CHECKING:
    import torch


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


def backend_available(kind: str) -> bool:
    """Whether torch can run on devices of type ``kind`` (``"mps"``, ``"xpu"``, ...) on this machine (``"meta"``: no)."""
    import torch

    if kind == "mps":
        return bool(torch.backends.mps.is_available())
    probe = getattr(getattr(torch, kind, None), "is_available", None)
    return bool(probe()) if callable(probe) else False


def rank_device(device: str | torch.device | None) -> str | torch.device | None:
    """The device of this process: under a launcher (``LOCAL_RANK`` set) ``None`` / ``"cuda"`` mean
    ``cuda:LOCAL_RANK``, each process its own GPU of its node (``RANK`` numbers the shards, across nodes);
    anything else is kept. A :class:`ConfigError` where that cannot work: ``LOCAL_RANK`` past the node's
    GPUs, or one GPU ``cuda:N`` asked for every process of a node that runs several (``LOCAL_WORLD_SIZE``
    > 1: ``--device cuda:1`` reaches every rank, and all would share that GPU) unless ``N`` is ``LOCAL_RANK``."""
    import torch

    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return device
    try:
        local_rank, per_node = int(local), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"LOCAL_RANK / LOCAL_WORLD_SIZE must be integers ({exc})") from exc
    try:
        asked = None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        return device  # not a device: resolve_device says so
    if asked is not None and not (asked.type == "cuda" and asked.index is None):
        if asked.type == "cuda" and per_node > 1 and asked.index != local_rank:
            raise ConfigError(
                f"device {str(device)!r} under a launcher that started {per_node} processes on this node would run every "
                "one of them on that GPU; pass --device cuda (or none): each process then uses its own GPU, "
                "cuda:LOCAL_RANK (choose the node's GPUs with CUDA_VISIBLE_DEVICES)"
            )
        return device
    if device is None and not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < count <= local_rank:
        raise ConfigError(f"LOCAL_RANK={local_rank}, but this node has {count} CUDA device(s) and each process of a launch "
                          f"uses its own, cuda:LOCAL_RANK: start at most {count} per node (torchrun --nproc_per_node {count})")
    return f"cuda:{local_rank}"
