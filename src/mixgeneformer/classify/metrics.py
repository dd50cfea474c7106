"""Predictions, scores (accuracy, macro precision / recall / F1, per-class reports) and write-back into obs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from ..errors import InputDataError
from .tasks import Task

if TYPE_CHECKING:
    import anndata

METRIC_COLUMNS = ("accuracy", "macro_precision", "macro_recall", "macro_f1")


@dataclass
class Prediction:
    """Predicted labels (and class probabilities) for the test cells of a task."""

    labels: np.ndarray  # object array of predicted class names
    probabilities: np.ndarray | None  # (n, len(classes)) float, or None
    classes: list[str]


@dataclass
class EvalResult:
    """Scores of one method on one task."""

    setting: str
    method: str
    metrics: dict[str, float]
    report: pd.DataFrame
    y_true: np.ndarray
    y_pred: np.ndarray
    probabilities: np.ndarray | None
    classes: list[str]
    rows: np.ndarray  # test positions in the test data's obs
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The result as one benchmark-table row."""
        return {"setting": self.setting, "method": self.method, **{k: self.metrics[k] for k in METRIC_COLUMNS}}


def classification_metrics(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 (sklearn) over the classes of ``y_true``.

    A class never predicted has precision 0 (``zero_division=0``), so macro scores do not flatter
    a classifier that ignores classes. A prediction of a class the test cells do not hold costs
    the recall of the cell's true class; it does not add a class to the average (whose weight
    would otherwise depend on what each method happens to predict).
    """

    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise InputDataError(f"need equally long, non-empty label arrays; got {y_true.shape} and {y_pred.shape}.")
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
    }


def per_class_report(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support (index: class, sorted)."""

    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    classes = np.unique(np.concatenate([y_true, y_pred]))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average=None, zero_division=0
    )
    return pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)},
        index=pd.Index([str(c) for c in classes], name="class"),
    )


def evaluate(task: Task, prediction: Prediction, method: str, **extra: Any) -> EvalResult:
    """Score ``prediction`` against the task's test labels."""
    if prediction.labels.shape[0] != task.test_labels.shape[0]:
        raise InputDataError(
            f"{prediction.labels.shape[0]} predictions for {task.test_labels.shape[0]} test cells."
        )
    return EvalResult(
        setting=task.setting,
        method=method,
        metrics=classification_metrics(task.test_labels, prediction.labels),
        report=per_class_report(task.test_labels, prediction.labels),
        y_true=task.test_labels,
        y_pred=np.asarray(prediction.labels, dtype=object),
        probabilities=prediction.probabilities,
        classes=list(prediction.classes),
        rows=task.test_rows,
        extra=dict(extra),
    )


def benchmark_table(results: Iterable[EvalResult]) -> pd.DataFrame:
    """One row per result: setting, method, accuracy, macro_precision, macro_recall, macro_f1."""
    rows = [r.row() for r in results]
    return pd.DataFrame(rows, columns=["setting", "method", *METRIC_COLUMNS])


def seed_summary(
    per_seed: pd.DataFrame, by: Sequence[str] = ("setting", "method"), metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean and sample sd (ddof=1; NaN for one seed: undefined, not 0) over seeds of every metric, per group, in first-seen order.

    A metric missing (NaN) in any seed of a group is NaN for that group (never a mean over fewer
    seeds than ``n_seeds`` says).

    ``per_seed``: rows of several seeds. Columns of the result: ``by``, n_seeds, n_train and n_test
    (means, when given), then ``<metric>`` (mean) and ``<metric>_sd`` for each of ``metrics``
    (default: accuracy and the macro scores). Every seed table of the package (demo report,
    benchmarks) is made here, so every ± is the same statistic.
    """
    grouped = per_seed.groupby(list(by), sort=False)
    sizes = [c for c in ("n_train", "n_test") if c in per_seed.columns and c not in (metrics or ())]
    table = grouped[sizes].mean().round(1) if sizes else pd.DataFrame(index=grouped.size().index)
    table.insert(0, "n_seeds", grouped.size())
    for metric in METRIC_COLUMNS if metrics is None else metrics:
        # A seed without a value (NaN) makes the group's mean and sd NaN: pandas would average the
        # other seeds silently, under an n_seeds that counts them all.
        complete = grouped[metric].count() == table["n_seeds"]
        table[metric] = grouped[metric].mean().where(complete)
        table[f"{metric}_sd"] = grouped[metric].std(ddof=1).where(complete)
    return table.reset_index()


def mean_sd_text(mean: float | None, sd: float | None, digits: int = 3) -> str:
    """``"m ± s"`` of a :func:`seed_summary` row; ``"m"`` alone where the sd is undefined (one seed), ``"n/a"`` without a mean."""
    if not _finite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if _finite(sd) else f"{mean:.{digits}f}"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and bool(np.isfinite(value))


def markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    """A pipe (GitHub markdown) table of a DataFrame, floats rounded to ``digits``."""
    def cell(value: object) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def write_predictions(adata: anndata.AnnData, result: EvalResult, key: str | None = None, overwrite: bool = False) -> None:
    """Write predictions into ``adata.obs`` in obs order (AnnData in, AnnData out).

    ``adata`` is the data the result was tested on, ``task.test_data`` (``run.task.test_data`` of
    :func:`run_classification`: ``result.rows`` are positions in its obs), modified in place.
    ``obs[f"{key}_pred"]`` holds the predicted class (categorical, NaN for cells that were not
    tested) and ``obs[f"{key}_prob"]`` the probability of that class (NaN when the method gives
    none). ``key`` defaults to ``f"{setting}_{method}"``. Existing columns are kept unless
    ``overwrite=True``.
    """
    key = key or f"{result.setting}_{result.method}"
    pred_col, prob_col = f"{key}_pred", f"{key}_prob"
    clash = [c for c in (pred_col, prob_col) if c in adata.obs.columns]
    if clash and not overwrite:
        raise InputDataError(f"obs already has {clash}; pass overwrite=True (CLI: --overwrite) or another key.")
    n = adata.n_obs
    if result.rows.size and int(result.rows.max()) >= n:
        raise InputDataError(
            f"the result's test cells reach obs position {int(result.rows.max())}, but adata has {n} cells: it is not "
            "the data this result was tested on; pass that one (task.test_data, e.g. run.task.test_data)."
        )
    predicted = np.full(n, None, dtype=object)
    predicted[result.rows] = result.y_pred
    probability = np.full(n, np.nan, dtype=np.float64)
    if result.probabilities is not None:
        class_index = pd.Index(result.classes).get_indexer(result.y_pred)
        probability[result.rows] = result.probabilities[np.arange(len(result.rows)), class_index]
    categories = sorted(set(result.classes) | set(result.y_pred.tolist()))
    adata.obs[pred_col] = pd.Categorical(predicted, categories=categories)
    adata.obs[prob_col] = probability


def _argmax_labels(proba: np.ndarray, classes: list[str]) -> np.ndarray:
    return np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)]
