"""Confusion matrix heat maps: from two label arrays or a precomputed count matrix."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import ConfigError, InputDataError
from .common import _class_names, _finish, plain_text

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def _matrix_in_order(matrix: pd.DataFrame, labels: list[object]) -> np.ndarray:
    """The counts of a DataFrame confusion matrix with rows and columns both in ``labels``' order
    (by name: a table whose columns are in another order than its index, or a ``labels=`` order,
    was drawn as stored, its counts under the wrong classes)."""
    if set(matrix.columns) != set(matrix.index):
        raise InputDataError(f"matrix must have the same classes as rows (true) and columns (predicted); rows "
                             f"{list(matrix.index)}, columns {list(matrix.columns)}")
    if set(labels) != set(matrix.index) or len(labels) != len(set(labels)):
        raise InputDataError(f"labels {labels} must name each class of the matrix once; the matrix has {list(matrix.index)}")
    return matrix.reindex(index=labels, columns=labels).to_numpy(dtype=np.float64)


def _counts_of_labels(y_true: ArrayLike, y_pred: ArrayLike, labels: Iterable[object] | None) -> tuple[np.ndarray, list[str]]:
    """The count matrix (rows true, columns predicted) of two label arrays and its class order."""
    (true, true_numeric), (pred, pred_numeric) = _class_names(y_true), _class_names(y_pred)
    if len(true) != len(pred):
        raise InputDataError(f"y_true has {len(true)} labels but y_pred has {len(pred)}")
    present = set(true.dropna()) | set(pred.dropna())
    if labels is None:
        labels = sorted(present, key=float if true_numeric and pred_numeric else None)  # "2" before "10"
    else:
        labels = list(_class_names(list(labels))[0])
        left_out = sorted(present - set(labels))
        if left_out or len(labels) != len(set(labels)):  # cells of a class left out vanished from its row total
            raise InputDataError(f"labels {labels} must name each class once, and every class of y_true / y_pred; "
                                 f"missing: {left_out}. List them all, or leave labels out")
    position = {label: i for i, label in enumerate(labels)}
    t, p = (names.map(position).to_numpy(dtype=np.float64, na_value=np.nan) for names in (true, pred))
    ok = ~(np.isnan(t) | np.isnan(p))
    counts = np.zeros((len(labels), len(labels)))
    np.add.at(counts, (t[ok].astype(np.int64), p[ok].astype(np.int64)), 1)
    return counts, labels



# long: a 20-line docstring; the body annotates every cell of the matrix.
def confusion_matrix(
    y_true: ArrayLike | None = None,
    y_pred: ArrayLike | None = None,
    *,
    labels: Iterable[object] | None = None,
    matrix: np.ndarray | pd.DataFrame | None = None,
    normalize: bool = True,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Confusion matrix heat map, rows = true class, normalized per row by default.

    Parameters
    ----------
    y_true, y_pred
        True and predicted labels (same length; a cell missing either is left out). Numbers are
        compared as numbers (1 and 1.0 are one class). Ignored when ``matrix`` is given.
    labels
        Class order; it must name every class of ``y_true`` and ``y_pred`` (it may add classes).
        Default: sorted union of both label sets (by value when all are numbers), or the matrix'
        index. With a DataFrame ``matrix``, its classes in the order to draw (matched by name).
    matrix
        A precomputed count matrix (rows true, columns predicted; finite, non-negative), e.g. a
        DataFrame indexed by class with the same classes as columns (in any order).
    normalize
        Show row fractions (each true class sums to 1); counts otherwise. Row totals are shown
        in the y tick labels either way. Up to 25 classes, every non-zero cell is annotated.
    title, save
        Figure title; optional output path.
    """
    if matrix is not None:
        if isinstance(matrix, pd.DataFrame):
            labels = list(matrix.index) if labels is None else list(labels)
            counts = _matrix_in_order(matrix, labels)
        else:
            counts = np.asarray(matrix, dtype=np.float64)
            labels = list(range(len(counts) if counts.ndim else 0)) if labels is None else list(labels)
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(labels):
            raise InputDataError(f"matrix must be square with one row per label; got {counts.shape} for {len(labels)} labels")
        if not (np.isfinite(counts) & (counts >= 0)).all():
            raise InputDataError("matrix must hold counts (finite, >= 0); it has NaN, infinite or negative cells")
    else:
        if y_true is None or y_pred is None:
            raise ConfigError("pass y_true and y_pred, or matrix=")
        counts, labels = _counts_of_labels(y_true, y_pred, labels)
    if not len(labels):
        raise InputDataError("the confusion matrix has no class: no cell has both a true and a predicted label")

    totals = counts.sum(axis=1)
    shown = counts / np.where(totals > 0, totals, 1)[:, None] if normalize else counts
    k = len(labels)
    side = max(4.0, 0.45 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "cells")
    ax.set_xticks(range(k), [plain_text(x) for x in labels], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), [plain_text(f"{x} (n={int(n)})") for x, n in zip(labels, totals, strict=True)], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 25:
        threshold = 0.5 * (shown.max() if shown.size else 1)
        for i, j in zip(*np.nonzero(counts), strict=True):  # the non-zero cells, row i (true) at y = i
            text = f"{shown[i, j]:.2f}" if normalize else f"{counts[i, j]:.10g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if shown[i, j] > threshold else "black")
    ax.set_title(title or ("confusion matrix (row-normalized)" if normalize else "confusion matrix"))
    return _finish(fig, save)
