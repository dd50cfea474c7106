"""The run's ``metrics.csv``: its columns, the Trainer callback that appends one row per log event
(rank 0 only), the cut back to a resumed checkpoint's step, and the reader.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from .fileio import atomic_file

METRICS_FIELDS = (
    "step",
    "epoch",
    "loss",
    "mlm_loss",
    "contrastive_loss",
    "cross_species_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "eval_loss",
    "eval_mlm_loss",
    "eval_top1",
    "eval_top10",
    "eval_unigram_loss",
    "eval_unigram_top1",
    "eval_unigram_top10",
    "eval_rank_unigram_loss",
    "eval_rank_unigram_top1",
    "eval_rank_unigram_top10",
    "time_s",
)


class MetricsCSV(TrainerCallback):
    """Append one row per log event to ``metrics.csv`` (rank 0 only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if not any(k in logs for k in ("loss", "eval_loss")):
            return
        row = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.perf_counter() - self.start, 3)}
        row.update({k: logs[k] for k in METRICS_FIELDS if k in logs})
        new = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRICS_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)


def _complete_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` whose line was written whole: a run killed (or read) in the
    middle of appending a row leaves a last line without its line end, which is left out."""
    with open(path, newline="") as handle:
        text = handle.read()
    return list(csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1], newline="")))


def trim_metrics(path: Path, max_step: int) -> None:
    """Keep only the rows of ``metrics.csv`` logged at or before ``max_step`` (atomically); a row
    cut short by a crash while it was being appended is dropped."""
    if not path.exists():
        return
    rows = [row for row in _complete_rows(path) if float(row.get("step") or 0) <= max_step]
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=METRICS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a run's ``metrics.csv`` as dicts of floats (empty cells omitted; a last row still
    being written, or cut short by a crash, left out)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in _complete_rows(path)]
