"""Training curves: loss parts, learning rate and held-out scores against the optimizer step."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import InputDataError
from ..fileio import check_readable_file
from .common import _finish, _pick


def _series(table: pd.DataFrame, steps: pd.Series, col: Any) -> tuple[np.ndarray, np.ndarray]:
    """(step, value) of a column's logged values in step order; a step logged twice: its last value."""
    logged = pd.DataFrame({"x": steps, "y": pd.to_numeric(table[col], errors="coerce")}).dropna()
    logged = logged.drop_duplicates("x", keep="last").sort_values("x", kind="stable")
    return logged["x"].to_numpy(np.float64), logged["y"].to_numpy(np.float64)


def _plot_series(ax: Any, table: pd.DataFrame, steps: pd.Series, columns: list[Any], step_col: str, ylabel: str, title: str) -> None:
    """One panel: a line per column against the step (NaN cells skipped); baselines (``unigram``) dashed."""
    for col in columns:
        x, y = _series(table, steps, col)
        if len(x):
            style = "--" if "unigram" in str(col) else "-"
            ax.plot(x, y, style, label=col, marker="o" if len(x) < 30 else None, markersize=3)
    ax.set_xlabel(step_col)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)


def _read_metrics_csv(metrics: str | os.PathLike) -> pd.DataFrame:
    """A metrics CSV; a last line cut short by a crash while it was appended (no line end, fewer
    fields than the header) is left out: its cut number would be drawn as a logged value."""
    path = check_readable_file(metrics, "metrics CSV")
    try:
        text = path.read_text(encoding="utf-8")
        last = text[text.rfind("\n") + 1:]
        if last and last.count(",") < text.partition("\n")[0].count(","):
            text = text[: len(text) - len(last)]
        return pd.read_csv(io.StringIO(text))
    except (UnicodeDecodeError, pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise InputDataError(f"metrics CSV {path} cannot be parsed ({exc}); is it truncated?") from exc


def training_curves(
    metrics: str | os.PathLike | pd.DataFrame,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Loss parts and learning rate against the optimizer step.

    Parameters
    ----------
    metrics
        A CSV path or DataFrame with a step column (``step`` or ``global_step``), one or more
        loss columns (any name containing ``loss``) and optionally a learning-rate column
        (``lr`` or ``learning_rate``). Empty cells (metrics logged at other steps) are skipped
        per series; each series is drawn in step order, a step logged twice with its last value
        (a resumed run's log not cut back to its checkpoint); a CSV's last line cut short by a crash
        is left out. Held-out accuracies (``eval_top1`` / ``eval_top10``, the baselines'
        ``eval_*unigram_top*``) or a fine-tuning log's ``eval_macro_f1`` / ``eval_accuracy`` get a
        panel of their own; baselines (``unigram`` in the name) are dashed.
    """
    table = metrics if isinstance(metrics, pd.DataFrame) else _read_metrics_csv(metrics)
    columns = list(table.columns)
    step_col = _pick(columns, None, ("step", "global_step", "steps"), "step")
    loss_cols = [c for c in columns if "loss" in str(c).lower()]
    if not loss_cols:
        raise InputDataError(f"no loss column in the metrics (looked for names containing 'loss'); columns: {columns}")
    steps = pd.to_numeric(table[step_col], errors="coerce")
    if not any(len(_series(table, steps, c)[0]) for c in loss_cols):
        raise InputDataError(f"the metrics ({len(table)} rows) hold no loss value at a step yet; nothing to plot")
    lr_col = next((c for c in ("lr", "learning_rate") if c in columns and len(_series(table, steps, c)[0])), None)

    accuracy_cols = [c for c in columns if str(c).startswith("eval_") and any(w in str(c) for w in ("top", "f1", "accuracy"))
                     and len(_series(table, steps, c)[0])]  # held-out top-k (pretraining), validation macro-F1 (fine-tuning)
    n_panels = 1 + bool(lr_col) + bool(accuracy_cols)
    fig = Figure(figsize=(4.5 * n_panels + 2, 4), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    _plot_series(axes[0], table, steps, loss_cols, step_col, "loss", "losses")
    if lr_col:
        _plot_series(axes[1], table, steps, [lr_col], step_col, lr_col, "learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if accuracy_cols:
        name = "held-out masked-gene accuracy" if all("top" in str(c) for c in accuracy_cols) else "validation scores"
        _plot_series(axes[-1], table, steps, accuracy_cols, step_col, "score", name)
        axes[-1].set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    return _finish(fig, save)
