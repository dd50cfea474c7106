"""Cell-type classification: fine-tuning, zero-shot kNN / logistic regression, transfer, baselines.

The flow every method shares:

1. :func:`prepare_labels` validates the label column once, at the door (RELIABILITY 11): a missing
   column lists the obs columns, NaN labels are dropped and counted, rare classes are dropped
   (default: under 0.5% of labelled cells, as the Mix-Geneformer authors do), one class is an error.
2. A :class:`Task` says which cells train and which are tested: :func:`within_task` makes a
   stratified 80/20 split (seed 42); :func:`transfer_task` trains on one species and tests on the
   other, on the labels both share after :func:`match_labels`.
3. A method predicts the test cells: fine-tuning (:func:`fit_classifier`), zero-shot on frozen
   embeddings (:func:`zero_shot`), or a count-based baseline (:func:`baselines`).
4. :func:`evaluate` scores it (accuracy, macro precision / recall / F1, a per-class report) and
   :func:`write_predictions` writes ``<key>_pred`` / ``<key>_prob`` back into ``obs`` in order.
   :func:`benchmark_table` stacks results into one table.

Cross-species label matching (:func:`canonical_label`): a label is lower-cased, every run of
characters other than letters and digits becomes ``_``, leading / trailing ``_`` are stripped, and
the result is looked up in :data:`LABEL_SYNONYMS` (e.g. ``"T cells"`` -> ``t_cells`` -> ``t_cell``;
``"PP"`` -> ``gamma``). Labels are then matched by exact equality of these canonical names; classes
present on one side only are dropped and reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, InputDataError

logger = logging.getLogger(__name__)

Method = Literal["finetune", "knn", "logreg"]
BaselineMethod = Literal["logreg_counts", "knn_pca"]
METRIC_COLUMNS = ("accuracy", "macro_precision", "macro_recall", "macro_f1")

#: Canonical-name synonyms used to match labels across datasets / species (applied after
#: :func:`canonical_label`'s normalisation). Extend per call with ``synonyms=``.
LABEL_SYNONYMS: dict[str, str] = {
    "t_cells": "t_cell",
    "tcell": "t_cell",
    "t_lymphocyte": "t_cell",
    "b_cells": "b_cell",
    "bcell": "b_cell",
    "b_lymphocyte": "b_cell",
    "pp": "gamma",
    "pp_cell": "gamma",
    "gamma_cell": "gamma",
    "alpha_cell": "alpha",
    "beta_cell": "beta",
    "delta_cell": "delta",
    "epsilon_cell": "epsilon",
    "ductal_cell": "ductal",
    "acinar_cell": "acinar",
    "endothelial_cell": "endothelial",
    "mast_cell": "mast",
    "schwann_cell": "schwann",
    "macrophages": "macrophage",
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class LabelConfig:
    """Which cells and classes take part.

    ``min_class_fraction`` drops classes under that fraction of labelled cells (the authors' 0.5%);
    ``min_class_count`` drops classes with fewer cells (at least 2 are needed to stratify).
    ``unseen_test_labels``: test cells whose label training never saw (a separate test set) are
    dropped and reported (``"drop"``, the default) or raise an error (``"error"``).
    ``transfer_split``: with a separate test set, train on the training split of the first and
    test on the test split of the second (``test_size``, ``seed``), so transfer and within-dataset
    runs of one seed share their cells; by default every cell of each is used.
    """

    key: str = "cell_type1"
    min_class_fraction: float = 0.005
    min_class_count: int = 2
    test_size: float = 0.2
    seed: int = 42
    unseen_test_labels: Literal["error", "drop"] = "drop"
    transfer_split: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_class_fraction < 1.0:
            raise ConfigError(f"labels.min_class_fraction={self.min_class_fraction} must be in [0, 1).")
        if self.min_class_count < 1:
            raise ConfigError(f"labels.min_class_count={self.min_class_count} must be at least 1.")
        if not 0.0 < self.test_size < 1.0:
            raise ConfigError(f"labels.test_size={self.test_size} must be strictly between 0 and 1.")


@dataclass
class EmbeddingConfig:
    """How frozen cell embeddings are taken (the same for every model compared)."""

    layer: int = -2
    pooling: Literal["mean", "cls"] = "mean"
    batch_size: int = 32
    knn_k: int = 5
    logreg_c: float = 1.0


@dataclass
class FinetuneConfig:
    """Fine-tuning a classification head (and optionally the encoder) on the HF Trainer.

    The recipe (see :func:`fit_classifier`): a stratified validation split carved from the training
    cells (``validation_fraction``), evaluation every epoch, the checkpoint with the best
    validation macro-F1 kept (early stopping after ``early_stopping_patience`` epochs without a
    gain), class-weighted cross-entropy when classes are imbalanced, and learning rates fitted to
    the model: ``learning_rate=None`` picks :func:`default_learning_rate` of the encoder's width
    (the authors' 5e-5 for their 256-wide model, higher for narrower ones), and the freshly
    initialised head learns at ``head_learning_rate`` (default ``head_lr_multiplier`` × the
    encoder's rate). The warmup is capped at ``warmup_max_fraction`` of all steps.

    ``pooling="auto"`` pools cells the way the model was pretrained (its ``config.pooling``: mean
    over genes, or the ``<cls>`` state when the cells start with one). ``freeze_layers=k`` freezes
    the embeddings and the bottom ``k`` blocks; ``freeze_embeddings`` freezes only the embeddings.
    ``seed`` (default: the split seed ``labels.seed``) seeds the head, dropout, data order and the
    validation split: the same call gives the same model on the same machine.
    """

    learning_rate: float | None = None
    head_learning_rate: float | None = None
    head_lr_multiplier: float = 10.0
    batch_size: int = 16
    epochs: float = 10.0
    max_steps: int = -1
    warmup_steps: int = 500
    warmup_max_fraction: float = 0.1
    weight_decay: float = 0.001
    train_encoder: bool = True
    freeze_layers: int = 0
    freeze_embeddings: bool = False
    pooling: Literal["auto", "mean", "cls"] = "auto"
    classifier_dropout: float = 0.1
    validation_fraction: float = 0.1
    early_stopping_patience: int = 3
    class_weights: Literal["auto", "balanced", "none"] = "auto"
    imbalance_ratio: float = 1.5
    seed: int | None = None
    max_len: int | None = None
    device: str | None = None
    bf16: bool = False
    logging_steps: int = 50

    def __post_init__(self) -> None:
        if self.freeze_layers < 0:
            raise ConfigError(f"finetune.freeze_layers={self.freeze_layers} must be >= 0.")
        if self.batch_size < 1:
            raise ConfigError(f"finetune.batch_size={self.batch_size} must be >= 1.")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("finetune.epochs must be > 0 (or set finetune.max_steps > 0).")
        for name in ("learning_rate", "head_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"finetune.{name}={value} must be > 0 (or null for the default).")
        if not self.head_lr_multiplier > 0:
            raise ConfigError(f"finetune.head_lr_multiplier={self.head_lr_multiplier} must be > 0.")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ConfigError(
                f"finetune.validation_fraction={self.validation_fraction} must be in [0, 0.5) (0: no validation split)."
            )
        if self.early_stopping_patience < 0:
            raise ConfigError(
                f"finetune.early_stopping_patience={self.early_stopping_patience} must be >= 0 (0: train every epoch)."
            )
        if self.imbalance_ratio < 1.0:
            raise ConfigError(f"finetune.imbalance_ratio={self.imbalance_ratio} must be >= 1.")
        if not 0.0 <= self.warmup_max_fraction <= 1.0:
            raise ConfigError(f"finetune.warmup_max_fraction={self.warmup_max_fraction} must be in [0, 1].")


@dataclass
class BaselineConfig:
    """Count-based baselines (CellTypist-style logistic regression; kNN on PCA)."""

    target_sum: float = 1e4
    clip: float = 10.0
    logreg_c: float = 1.0
    max_iter: int = 1000
    n_pcs: int = 50
    knn_k: int = 5


@dataclass
class ClassifyConfig:
    """Everything a classification run used; saved as ``config.yaml`` beside its outputs."""

    labels: LabelConfig = field(default_factory=LabelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    synonyms: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@dataclass
class LabelSelection:
    """The cells kept for classification and why the others were left out."""

    rows: np.ndarray  # int64 positions into obs of the kept cells, ascending
    labels: np.ndarray  # object array of str labels, aligned with ``rows``
    classes: list[str]  # kept classes, sorted
    n_input: int
    n_missing: int
    dropped_classes: dict[str, int]

    def summary(self) -> str:
        """One line: cells kept, NaN labels dropped, rare classes dropped."""
        dropped = ", ".join(f"{k} ({v})" for k, v in self.dropped_classes.items()) or "none"
        return (
            f"{len(self.rows)}/{self.n_input} cells in {len(self.classes)} classes; "
            f"{self.n_missing} with missing labels dropped; rare classes dropped: {dropped}"
        )


def _obs_of(data: Any) -> pd.DataFrame:
    return data if isinstance(data, pd.DataFrame) else data.obs


def prepare_labels(
    data: Any,
    key: str = "cell_type1",
    min_class_fraction: float = 0.005,
    min_class_count: int = 2,
) -> LabelSelection:
    """Validate a label column and select the cells and classes to classify.

    Parameters
    ----------
    data
        An AnnData (its ``obs`` is used) or an obs DataFrame.
    key
        The label column.
    min_class_fraction
        Classes with fewer than this fraction of the labelled cells are dropped (0.5% as the
        authors); 0 keeps every class.
    min_class_count
        Classes with fewer cells than this are dropped too.

    Returns
    -------
    LabelSelection
        Kept rows (obs order), their labels, the kept classes and what was dropped.

    Raises
    ------
    InputDataError
        The column is missing (the message lists the obs columns), no cell has a label, or fewer
        than two classes remain.
    """
    obs = _obs_of(data)
    if key not in obs.columns:
        raise InputDataError(
            f"label column {key!r} not found in obs. Available obs columns: {list(map(str, obs.columns))}. "
            "Pass the right one with --label / key=."
        )
    column = obs[key]
    missing = column.isna().to_numpy()
    n_missing = int(missing.sum())
    if n_missing:
        logger.warning("%d cells have no %r label and are dropped", n_missing, key)
    labels = column.astype(object).where(~missing, None).to_numpy()
    labelled = np.flatnonzero(~missing)
    if labelled.size == 0:
        raise InputDataError(f"label column {key!r} has no labels (all {len(obs)} values are missing).")
    names = np.asarray([str(v) for v in labels[labelled]], dtype=object)
    classes, counts = np.unique(names, return_counts=True)
    threshold = max(float(min_class_count), min_class_fraction * labelled.size)
    rare = counts < threshold
    dropped = {str(c): int(n) for c, n in zip(classes[rare], counts[rare], strict=True)}
    if dropped:
        logger.warning(
            "dropping %d rare classes of %r (< %.1f cells): %s", len(dropped), key, threshold, dropped
        )
    kept_classes = [str(c) for c in classes[~rare]]
    if len(kept_classes) < 2:
        found = {str(c): int(n) for c, n in zip(classes, counts, strict=True)}
        raise InputDataError(
            f"label column {key!r} has {len(kept_classes)} class(es) with at least {threshold:.1f} cells "
            f"(classes and counts: {found}); classification needs two or more. Lower "
            "min_class_fraction / min_class_count or choose another label column."
        )
    keep = np.isin(names, kept_classes)
    return LabelSelection(
        rows=labelled[keep].astype(np.int64),
        labels=names[keep],
        classes=kept_classes,
        n_input=len(obs),
        n_missing=n_missing,
        dropped_classes=dropped,
    )


def stratified_split(labels: Sequence[str] | np.ndarray, test_size: float = 0.2, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle and split positions ``0..n-1`` into train / test, stratified by label.

    Returns sorted int64 position arrays ``(train, test)``; the same inputs and seed always give
    the same split.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels, dtype=object)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min(initial=2) < 2:
        small = {str(c): int(n) for c, n in zip(classes, counts, strict=True) if n < 2}
        raise InputDataError(f"classes {small} have fewer than 2 cells and cannot be split; raise min_class_count.")
    n_test = math.ceil(test_size * labels.size)
    if n_test < classes.size or labels.size - n_test < classes.size:
        raise InputDataError(
            f"{labels.size} cells cannot be split {1 - test_size:.0%}/{test_size:.0%} with every one of "
            f"{classes.size} classes on both sides; use more cells or a different test_size."
        )
    train, test = train_test_split(
        np.arange(labels.size), test_size=test_size, random_state=seed, shuffle=True, stratify=labels
    )
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def canonical_label(label: str, synonyms: Mapping[str, str] | None = None) -> str:
    """The name labels are matched by: lower-cased, non-alphanumerics -> ``_``, then synonyms."""
    name = canonical_label_key(label)
    table = {**LABEL_SYNONYMS, **{canonical_label_key(k): v for k, v in (synonyms or {}).items()}}
    return table.get(name, name)


def canonical_labels(labels: Sequence[str] | np.ndarray, synonyms: Mapping[str, str] | None = None) -> np.ndarray:
    """:func:`canonical_label` of every label (computed once per distinct label)."""
    uniques, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    mapped = np.asarray([canonical_label(u, synonyms) for u in uniques], dtype=object)
    return mapped[inverse.reshape(-1)]


def canonical_label_key(label: str) -> str:
    """Normalise a label without synonyms (lower-case, non-alphanumerics -> ``_``)."""
    return re.sub(r"[^0-9a-z]+", "_", str(label).strip().lower()).strip("_")


@dataclass
class LabelMatch:
    """How two label sets were matched: the shared canonical classes and what each side lost."""

    shared: list[str]
    source_only: dict[str, int]
    target_only: dict[str, int]
    source_names: dict[str, list[str]]  # canonical -> original names on the source side
    target_names: dict[str, list[str]]

    def summary(self) -> str:
        """One line listing shared classes and each side's dropped classes with their counts."""
        return (
            f"shared classes ({len(self.shared)}): {self.shared}; dropped from source: "
            f"{self.source_only or 'none'}; dropped from target: {self.target_only or 'none'}"
        )


def match_labels(
    source_labels: Sequence[str] | np.ndarray,
    target_labels: Sequence[str] | np.ndarray,
    synonyms: Mapping[str, str] | None = None,
) -> LabelMatch:
    """Match two label sets by canonical name (see :func:`canonical_label`).

    Raises
    ------
    InputDataError
        Fewer than two classes are shared.
    """
    def side(labels: Sequence[str] | np.ndarray) -> tuple[pd.Series, dict[str, list[str]]]:
        raw = pd.Series(np.asarray(labels, dtype=object)).astype(str)
        canon = pd.Series(canonical_labels(raw.to_numpy(), synonyms))
        names = {c: sorted(set(raw[canon == c])) for c in canon.unique()}
        return canon.value_counts(), names

    source_counts, source_names = side(source_labels)
    target_counts, target_names = side(target_labels)
    shared = sorted(set(source_counts.index) & set(target_counts.index))
    match = LabelMatch(
        shared=shared,
        source_only={str(k): int(v) for k, v in source_counts.items() if k not in shared},
        target_only={str(k): int(v) for k, v in target_counts.items() if k not in shared},
        source_names=source_names,
        target_names=target_names,
    )
    if len(shared) < 2:
        raise InputDataError(
            f"the two label sets share {len(shared)} class(es) after matching; need two or more. "
            f"Source classes: {sorted(source_names)}; target classes: {sorted(target_names)}. "
            "Add entries to synonyms= (e.g. {'pp': 'gamma'}) to match differently named classes."
        )
    logger.info("label matching: %s", match.summary())
    return match


def check_unseen_labels(
    train_classes: Iterable[str], test_labels: Sequence[str] | np.ndarray, policy: Literal["error", "drop"] = "error"
) -> np.ndarray:
    """Boolean mask of test cells whose label was seen in training.

    ``policy="error"`` raises :class:`InputDataError` naming the unseen labels and their counts;
    ``"drop"`` logs them and returns the mask to apply.
    """
    test_labels = np.asarray(test_labels, dtype=object)
    seen = np.isin(test_labels, np.asarray(list(train_classes), dtype=object))
    if not seen.all():
        unseen, counts = np.unique(test_labels[~seen], return_counts=True)
        detail = {str(u): int(n) for u, n in zip(unseen, counts, strict=True)}
        if policy == "error":
            raise InputDataError(
                f"test labels never seen in training: {detail}. Drop them with "
                "unseen_test_labels='drop' (CLI: --unseen drop) or train on data that has them."
            )
        logger.warning("dropping %d test cells with labels unseen in training: %s", int((~seen).sum()), detail)
    return seen


# --------------------------------------------------------------------------------------------
# Tasks: which cells train, which are tested
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """A train / test assignment of labelled cells, possibly in two AnnData objects.

    ``train_rows`` / ``test_rows`` are positions into ``train_data.obs`` / ``test_data.obs``; labels
    are aligned with them.
    """

    setting: str
    train_data: Any
    train_rows: np.ndarray
    train_labels: np.ndarray
    test_data: Any
    test_rows: np.ndarray
    test_labels: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """Classes the classifier is trained on."""
        return sorted(set(self.train_labels.tolist()))


def within_task(adata: Any, config: LabelConfig | None = None, setting: str = "within") -> Task:
    """Stratified train / test split of one labelled dataset (default 80/20, seed 42)."""
    config = config or LabelConfig()
    selection = prepare_labels(adata, config.key, config.min_class_fraction, config.min_class_count)
    train, test = stratified_split(selection.labels, config.test_size, config.seed)
    return Task(
        setting=setting,
        train_data=adata,
        train_rows=selection.rows[train],
        train_labels=selection.labels[train],
        test_data=adata,
        test_rows=selection.rows[test],
        test_labels=selection.labels[test],
        notes=[selection.summary()],
    )


def transfer_task(
    source: Any,
    target: Any,
    config: LabelConfig | None = None,
    setting: str = "transfer",
    synonyms: Mapping[str, str] | None = None,
    source_rows: np.ndarray | None = None,
    target_rows: np.ndarray | None = None,
) -> Task:
    """Train on ``source``, test on ``target``, on the classes both share.

    Rare classes are dropped on each side first (``config``), then labels are matched by canonical
    name (:func:`match_labels`); labels of the task are the canonical names. Source-only classes
    are dropped; target-only classes follow ``config.unseen_test_labels``. ``source_rows`` /
    ``target_rows`` restrict each side to given obs positions (e.g. the source's training split and
    the target's test split, so transfer and within-species numbers share test cells).
    """
    config = config or LabelConfig()

    def side(data: Any, rows: np.ndarray | None) -> LabelSelection:
        selection = prepare_labels(data, config.key, config.min_class_fraction, config.min_class_count)
        if rows is not None:
            keep = np.isin(selection.rows, np.asarray(rows))
            selection = dataclasses.replace(selection, rows=selection.rows[keep], labels=selection.labels[keep])
        return selection

    src, tgt = side(source, source_rows), side(target, target_rows)
    match = match_labels(src.labels, tgt.labels, synonyms)
    src_canon, tgt_canon = canonical_labels(src.labels, synonyms), canonical_labels(tgt.labels, synonyms)
    src_keep = np.isin(src_canon, match.shared)
    tgt_keep = check_unseen_labels(match.shared, tgt_canon, config.unseen_test_labels)
    return Task(
        setting=setting,
        train_data=source,
        train_rows=src.rows[src_keep],
        train_labels=src_canon[src_keep],
        test_data=target,
        test_rows=tgt.rows[tgt_keep],
        test_labels=tgt_canon[tgt_keep],
        notes=[f"source: {src.summary()}", f"target: {tgt.summary()}", match.summary()],
    )


# --------------------------------------------------------------------------------------------
# Metrics and results
# --------------------------------------------------------------------------------------------


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
    """Accuracy and macro precision / recall / F1 (sklearn; classes = labels seen in either array).

    A class never predicted has precision 0 (``zero_division=0``), so macro scores do not flatter
    a classifier that ignores classes.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise InputDataError(f"need equally long, non-empty label arrays; got {y_true.shape} and {y_pred.shape}.")
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
    }


def per_class_report(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support (index: class, sorted)."""
    from sklearn.metrics import precision_recall_fscore_support

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


def markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    """A pipe (GitHub markdown) table of a DataFrame, floats rounded to ``digits``."""
    def cell(value: Any) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def write_predictions(adata: Any, result: EvalResult, key: str | None = None, overwrite: bool = False) -> None:
    """Write predictions into ``adata.obs`` in obs order (AnnData in, AnnData out).

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
    predicted = np.full(n, None, dtype=object)
    predicted[result.rows] = result.y_pred
    probability = np.full(n, np.nan, dtype=np.float64)
    if result.probabilities is not None:
        class_index = pd.Index(result.classes).get_indexer(result.y_pred)
        probability[result.rows] = result.probabilities[np.arange(len(result.rows)), class_index]
    categories = sorted(set(result.classes) | set(result.y_pred.tolist()))
    adata.obs[pred_col] = pd.Categorical(predicted, categories=categories)
    adata.obs[prob_col] = probability


# --------------------------------------------------------------------------------------------
# Classifiers on feature matrices (frozen embeddings or normalized counts)
# --------------------------------------------------------------------------------------------


def knn_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 5, metric: str = "cosine"
) -> Prediction:
    """k-nearest-neighbour vote (default k=5, cosine), the zero-shot protocol of the paper."""
    from sklearn.neighbors import KNeighborsClassifier

    k = min(k, len(train_y))
    model = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute")
    model.fit(np.asarray(train_x), np.asarray(train_y, dtype=object))
    proba = model.predict_proba(np.asarray(test_x))
    classes = [str(c) for c in model.classes_]
    return Prediction(labels=_argmax_labels(proba, classes), probabilities=proba, classes=classes)


def logreg_predict(
    train_x: np.ndarray | sp.spmatrix,
    train_y: np.ndarray,
    test_x: np.ndarray | sp.spmatrix,
    c: float = 1.0,
    max_iter: int = 1000,
    standardize: bool = True,
    clip: float | None = None,
    seed: int = 0,
) -> Prediction:
    """L2 logistic regression (multinomial, lbfgs), features standardised on the training cells.

    ``clip`` caps standardised values at ``±clip`` (CellTypist caps at 10).
    """
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = _dense(train_x), _dense(test_x)
    if standardize:
        mean = train_x.mean(axis=0)
        std = train_x.std(axis=0)
        std[std == 0] = 1.0
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        if clip is not None:
            np.clip(train_x, -clip, clip, out=train_x)
            np.clip(test_x, -clip, clip, out=test_x)
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit(train_x, np.asarray(train_y, dtype=object))
    proba = model.predict_proba(test_x)
    classes = [str(cl) for cl in model.classes_]
    return Prediction(labels=_argmax_labels(proba, classes), probabilities=proba, classes=classes)


def _argmax_labels(proba: np.ndarray, classes: list[str]) -> np.ndarray:
    return np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)]


def _dense(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def zero_shot_predict(
    task: Task, train_embeddings: np.ndarray, test_embeddings: np.ndarray, method: Literal["knn", "logreg"], config: EmbeddingConfig | None = None
) -> Prediction:
    """Classify the task's test cells from frozen embeddings (rows aligned with the task's rows)."""
    config = config or EmbeddingConfig()
    if train_embeddings.shape[0] != task.train_rows.size or test_embeddings.shape[0] != task.test_rows.size:
        raise InputDataError(
            f"embeddings ({train_embeddings.shape[0]}, {test_embeddings.shape[0]} rows) do not match the "
            f"task's train/test cells ({task.train_rows.size}, {task.test_rows.size})."
        )
    if method == "knn":
        return knn_predict(train_embeddings, task.train_labels, test_embeddings, k=config.knn_k)
    if method == "logreg":
        return logreg_predict(train_embeddings, task.train_labels, test_embeddings, c=config.logreg_c)
    raise ConfigError(f"zero-shot method {method!r} is not one of ['knn', 'logreg'].")


# --------------------------------------------------------------------------------------------
# Count-based baselines
# --------------------------------------------------------------------------------------------


def _counts(adata: Any, layer: str | None = None) -> sp.csr_matrix:
    x = adata.layers[layer] if layer else adata.X
    return sp.csr_matrix(x) if not sp.isspmatrix_csr(x) else x


def log_normalize(counts: sp.spmatrix | np.ndarray, target_sum: float = 1e4) -> sp.csr_matrix:
    """Scale each cell to ``target_sum`` total counts, then ``log1p`` (CellTypist / scanpy style)."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    normalized = sp.diags(scale.astype(np.float32)) @ counts
    normalized.data = np.log1p(normalized.data)
    return sp.csr_matrix(normalized)


def ortholog_counts(adata: Any, species: Literal["human", "mouse"], layer: str | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts on human Ensembl IDs through one-to-one orthologs.

    Gene identifiers (symbols or Ensembl IDs, via :func:`genes.map_gene_ids`) are resolved for
    ``species``; mouse genes are mapped to their 1:1 human ortholog. Genes without one are dropped;
    genes mapping to the same human ID are summed. Returns ``(counts, human_ids)``.
    """
    from . import genes

    mapping = genes.map_gene_ids(np.asarray(adata.var_names, dtype=object), species=species)
    ids = np.asarray(mapping.ensembl_ids, dtype=object)
    if species == "mouse":
        table = genes.one_to_one_orthologs()
        to_human = pd.Series(table["human_id"].to_numpy(), index=table["mouse_id"].to_numpy())
        to_human = to_human[~to_human.index.duplicated()]
        ids = to_human.reindex(ids).fillna("").to_numpy(dtype=object)
    else:
        human_ok = set(genes.one_to_one_orthologs()["human_id"])
        ids = np.where(np.isin(ids, list(human_ok)), ids, "").astype(object)
    return _sum_columns_by_id(_counts(adata, layer), ids)


def _sum_columns_by_id(counts: sp.csr_matrix, ids: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Merge columns sharing an ID (summing), dropping columns whose ID is empty."""
    ids = np.asarray(ids, dtype=object).astype(str)
    keep = np.flatnonzero(ids != "")
    uniques, inverse = np.unique(ids[keep], return_inverse=True)
    merge = sp.csr_matrix(
        (np.ones(keep.size, dtype=np.float32), (keep, inverse.reshape(-1))), shape=(ids.size, uniques.size)
    )
    return sp.csr_matrix(counts.astype(np.float32) @ merge), uniques.astype(object)


def align_genes(
    a: sp.csr_matrix, a_ids: np.ndarray, b: sp.csr_matrix, b_ids: np.ndarray
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """Restrict two matrices to their shared gene IDs, in one common column order."""
    shared, a_pos, b_pos = np.intersect1d(np.asarray(a_ids, dtype=str), np.asarray(b_ids, dtype=str), return_indices=True)
    if shared.size == 0:
        raise InputDataError("the two datasets share no genes after ortholog mapping; check species and gene IDs.")
    return sp.csr_matrix(a[:, a_pos]), sp.csr_matrix(b[:, b_pos]), shared.astype(object)


def baseline_predict(
    train_counts: sp.spmatrix,
    train_y: np.ndarray,
    test_counts: sp.spmatrix,
    method: BaselineMethod,
    config: BaselineConfig | None = None,
    seed: int = 0,
) -> Prediction:
    """A count-based baseline on the same cells.

    ``logreg_counts``: normalise to 10,000, log1p, standardise (clip 10), L2 logistic regression
    (CellTypist-style). ``knn_pca``: the same normalisation, PCA (50 components, fit on training
    cells), kNN (k=5, cosine). Genes never expressed in training are left out.
    """
    from sklearn.decomposition import PCA

    config = config or BaselineConfig()
    train_log = log_normalize(train_counts, config.target_sum)
    test_log = log_normalize(test_counts, config.target_sum)
    expressed = np.flatnonzero(np.asarray(train_log.getnnz(axis=0)) > 0)
    train_log, test_log = train_log[:, expressed], test_log[:, expressed]
    if method == "logreg_counts":
        return logreg_predict(
            train_log, train_y, test_log, c=config.logreg_c, max_iter=config.max_iter, clip=config.clip, seed=seed
        )
    if method == "knn_pca":
        train_dense, test_dense = _dense(train_log), _dense(test_log)
        mean = train_dense.mean(axis=0)
        std = train_dense.std(axis=0)
        std[std == 0] = 1.0
        n_comps = min(config.n_pcs, train_dense.shape[0] - 1, train_dense.shape[1])
        pca = PCA(n_components=n_comps, random_state=seed, svd_solver="randomized")
        train_pcs = pca.fit_transform(np.clip((train_dense - mean) / std, -config.clip, config.clip))
        test_pcs = pca.transform(np.clip((test_dense - mean) / std, -config.clip, config.clip))
        return knn_predict(train_pcs, train_y, test_pcs, k=config.knn_k)
    raise ConfigError(f"baseline {method!r} is not one of ['logreg_counts', 'knn_pca'].")


def baselines(
    task: Task,
    methods: Sequence[BaselineMethod] = ("logreg_counts", "knn_pca"),
    config: BaselineConfig | None = None,
    species: tuple[str, str] | None = None,
    layer: str | None = None,
) -> list[EvalResult]:
    """Run count-based baselines on a task's cells.

    Within one dataset the genes are used as given. When ``species=(train_species, test_species)``
    names two different species, both sides are mapped to human Ensembl IDs through one-to-one
    orthologs (:func:`ortholog_counts`) and restricted to the shared genes.
    """
    if species is not None and species[0] != species[1]:
        train_all, train_ids = ortholog_counts(task.train_data, species[0], layer)  # type: ignore[arg-type]
        test_all, test_ids = ortholog_counts(task.test_data, species[1], layer)  # type: ignore[arg-type]
        train_all, test_all, shared = align_genes(train_all, train_ids, test_all, test_ids)
        note = f"{shared.size} one-to-one ortholog genes shared"
        logger.info("baselines: %s", note)
        train_counts, test_counts = train_all[task.train_rows], test_all[task.test_rows]
    else:
        if task.train_data is not task.test_data:
            train_names = np.asarray(task.train_data.var_names, dtype=str)
            test_names = np.asarray(task.test_data.var_names, dtype=str)
            train_all, test_all, shared = align_genes(
                _counts(task.train_data, layer), train_names, _counts(task.test_data, layer), test_names
            )
            train_counts, test_counts = train_all[task.train_rows], test_all[task.test_rows]
        else:
            matrix = _counts(task.train_data, layer)
            train_counts, test_counts = matrix[task.train_rows], matrix[task.test_rows]
    return [
        evaluate(task, baseline_predict(train_counts, task.train_labels, test_counts, method, config), method)
        for method in methods
    ]


# --------------------------------------------------------------------------------------------
# Tokens and embeddings of a task's cells
# --------------------------------------------------------------------------------------------

@dataclass
class TokenizedCells:
    """A tokenized corpus of some cells of an AnnData: ``rows[i]`` is the obs position of corpus row i."""

    dataset: Any  # datasets.Dataset with column input_ids
    rows: np.ndarray

    def select(self, obs_rows: np.ndarray) -> Any:
        """The corpus rows of the given obs positions (all must have been tokenized), in that order."""
        position = pd.Index(self.rows).get_indexer(np.asarray(obs_rows))
        if (position < 0).any():
            raise InputDataError(f"{int((position < 0).sum())} requested cells were dropped by the tokenizer.")
        return self.dataset.select(position)


def tokenize_cells(adata: Any, vocab: Any, medians: Any, tokenize_config: Any = None, max_len: int | None = None) -> TokenizedCells:
    """Rank-value tokenize every cell of ``adata`` (input left untouched), remembering obs positions.

    Cells the tokenizer drops (no vocabulary gene) are absent from ``rows``; :func:`restrict_to_tokenized`
    removes them from a task with a count.
    """
    from .tokenize import tokenize_for_model

    dataset, rows, _ = tokenize_for_model(adata, vocab, medians, tokenize_config, max_len)
    return TokenizedCells(dataset=dataset, rows=rows)


def restrict_to_tokenized(task: Task, train_tokens: TokenizedCells, test_tokens: TokenizedCells) -> Task:
    """Drop task cells the tokenizer dropped, with a note saying how many."""
    train_keep = np.isin(task.train_rows, train_tokens.rows)
    test_keep = np.isin(task.test_rows, test_tokens.rows)
    if train_keep.all() and test_keep.all():
        return task
    note = (
        f"cells without any vocabulary gene dropped: {int((~train_keep).sum())} train, "
        f"{int((~test_keep).sum())} test"
    )
    logger.warning(note)
    return dataclasses.replace(
        task,
        train_rows=task.train_rows[train_keep],
        train_labels=task.train_labels[train_keep],
        test_rows=task.test_rows[test_keep],
        test_labels=task.test_labels[test_keep],
        notes=[*task.notes, note],
    )


def tokenize_task(task: Task, vocab: Any, medians: Any, tokenize_config: Any = None, max_len: int | None = None) -> tuple[Task, TokenizedCells, TokenizedCells]:
    """Tokenize the task's data (once when train and test share an AnnData) and drop untokenizable cells."""
    train_tokens = tokenize_cells(task.train_data, vocab, medians, tokenize_config, max_len)
    test_tokens = (
        train_tokens
        if task.test_data is task.train_data
        else tokenize_cells(task.test_data, vocab, medians, tokenize_config, max_len)
    )
    return restrict_to_tokenized(task, train_tokens, test_tokens), train_tokens, test_tokens


def _max_len_of(model: Any) -> int:
    from .embed import encoder_of

    return int(encoder_of(model).config.max_position_embeddings)


def zero_shot(
    task: Task,
    model: Any,
    vocab: Any,
    medians: Any,
    methods: Sequence[Literal["knn", "logreg"]] = ("knn", "logreg"),
    config: EmbeddingConfig | None = None,
    tokenize_config: Any = None,
    device: str | None = None,
    tokens: tuple[TokenizedCells, TokenizedCells] | None = None,
) -> list[EvalResult]:
    """Classify with kNN / logistic regression on frozen cell embeddings of ``model``.

    Every model is embedded the same way (``config.layer``, default the second-to-last layer;
    ``config.pooling``, default mean over genes), the fair protocol of SPEC §5.
    """
    from .embed import embed_corpus

    config = config or EmbeddingConfig()
    if tokens is None:
        task, train_tokens, test_tokens = tokenize_task(task, vocab, medians, tokenize_config, _max_len_of(model))
    else:
        train_tokens, test_tokens = tokens
        task = restrict_to_tokenized(task, train_tokens, test_tokens)

    def embed(tokens: TokenizedCells, rows: np.ndarray) -> np.ndarray:
        return embed_corpus(
            model, tokens.select(rows), vocab, layer=config.layer, pooling=config.pooling,
            batch_size=config.batch_size, device=device, progress=False,
        )

    train_x, test_x = embed(train_tokens, task.train_rows), embed(test_tokens, task.test_rows)
    return [evaluate(task, zero_shot_predict(task, train_x, test_x, m, config), m) for m in methods]


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


def _classifier_class() -> type:
    """The classification model class (built lazily: importing transformers is slow)."""
    global _CLASSIFIER_CLASS
    if _CLASSIFIER_CLASS is not None:
        return _CLASSIFIER_CLASS
    import torch
    from torch import nn
    from transformers import BertModel, BertPreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput

    from .embed import pool_cells
    from .model import MixGeneformerConfig

    class MixGeneformerForCellClassification(BertPreTrainedModel):
        """BERT encoder + dropout + linear head on the pooled cell embedding.

        Pooling is the embedding protocol's (mean over gene tokens of the last layer, or the
        ``<cls>`` state, ``config.cell_pooling``); ``config.special_token_ids`` lists the
        non-gene tokens. Encoder keys match ``BertForMaskedLM``'s ``bert.*``.
        """

        config_class = MixGeneformerConfig

        def __init__(self, config: Any):
            super().__init__(config)
            self.num_labels = config.num_labels
            self.bert = BertModel(config, add_pooling_layer=False)
            dropout = getattr(config, "classifier_dropout", None)
            self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
            # A plain array, not a buffer: from_pretrained leaves non-persistent buffers uninitialised.
            self.special_ids = np.asarray(config.special_token_ids or [config.pad_token_id or 0], dtype=np.int64)
            # Per-class loss weights while fine-tuning (a plain attribute: not saved with the model).
            self.loss_weights: torch.Tensor | None = None
            self.post_init()

        def forward(self, input_ids: Any, attention_mask: Any = None, labels: Any = None, **_: Any) -> Any:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            pooled = pool_cells(hidden, input_ids, attention_mask, self.special_ids, self.config.cell_pooling)
            logits = self.classifier(self.dropout(pooled.to(self.classifier.weight.dtype)))
            loss = None
            if labels is not None:
                weight = None if self.loss_weights is None else self.loss_weights.to(logits.device)
                loss = nn.functional.cross_entropy(logits.float(), labels, weight=weight)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    _CLASSIFIER_CLASS = MixGeneformerForCellClassification
    return _CLASSIFIER_CLASS


_CLASSIFIER_CLASS: type | None = None


def build_classifier(
    model: Any, classes: Sequence[str], vocab: Any, config: FinetuneConfig | None = None, seed: int | None = None
) -> Any:
    """A classification model initialised from ``model``'s encoder, with layers frozen per ``config``.

    ``config.train_encoder=False`` trains only the head; ``config.freeze_layers=k`` freezes the
    embeddings and the bottom ``k`` encoder layers; ``config.freeze_embeddings`` the embeddings.
    ``config.pooling="auto"`` is resolved here from the model alone (mean unless it was pretrained
    with ``cls`` / ``pooler`` pooling); :func:`fit_classifier` also checks the cells' first token.
    ``seed`` initialises the head from that seed without touching the global random state
    (default: the global state, as any torch module).
    """
    import copy

    import torch

    from .embed import encoder_of

    config = config or FinetuneConfig()
    bert = encoder_of(model)
    n_layers = len(bert.encoder.layer)
    if config.freeze_layers > n_layers:
        raise ConfigError(f"finetune.freeze_layers={config.freeze_layers} but the model has {n_layers} layers.")
    model_config = copy.deepcopy(bert.config)
    model_config.num_labels = len(classes)
    model_config.id2label = dict(enumerate(classes))
    model_config.label2id = {c: i for i, c in enumerate(classes)}
    model_config.cell_pooling = resolve_pooling(config.pooling, model)
    model_config.classifier_dropout = config.classifier_dropout
    model_config.special_token_ids = [int(i) for i in vocab.special_ids]
    model_config.vocab_hash = vocab.hash
    if seed is None:
        classifier = _classifier_class()(model_config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = _classifier_class()(model_config)
    missing, unexpected = classifier.bert.load_state_dict(bert.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ConfigError(f"encoder weights do not fit the classifier: missing {missing}, unexpected {unexpected}.")
    trainable = config.train_encoder
    for parameter in classifier.bert.parameters():
        parameter.requires_grad = trainable
    if trainable and (config.freeze_layers or config.freeze_embeddings):
        for module in (classifier.bert.embeddings, *classifier.bert.encoder.layer[: config.freeze_layers]):
            for parameter in module.parameters():
                parameter.requires_grad = False
    return classifier


def resolve_pooling(pooling: str, model: Any, first_tokens: np.ndarray | None = None, special_ids: Any = None) -> str:
    """The cell pooling of a classifier: ``"mean"`` / ``"cls"`` as given; ``"auto"`` follows pretraining.

    ``"auto"``: a model pretrained with ``cls`` or ``pooler`` pooling (the state at position 0) is
    pooled at ``<cls>`` when every cell starts with a special token (``first_tokens`` /
    ``special_ids``, when given), otherwise (and for ``mean`` pretraining) by the mean over genes.
    """
    if pooling in ("mean", "cls"):
        return pooling
    if pooling != "auto":
        raise ConfigError(f"finetune.pooling={pooling!r} is not one of ['auto', 'mean', 'cls'].")
    from .embed import encoder_of

    pretrained = getattr(getattr(model, "config", None), "pooling", None) or getattr(
        encoder_of(model).config, "pooling", "mean"
    )
    if pretrained not in ("cls", "pooler"):
        return "mean"
    if first_tokens is not None and special_ids is not None:
        if not np.isin(np.asarray(first_tokens), np.asarray(special_ids)).all():
            return "mean"
    return "cls"


def default_learning_rate(hidden_size: int) -> float:
    """Encoder fine-tuning learning rate for a model of this width: ``5e-5 × (256 / hidden)²``, at most 1e-3.

    5e-5 is the authors' rate for their 256-wide model; a 64-wide model fine-tuned at that rate
    barely moves in 10 epochs (validation macro-F1 at chance on the demo data), while ~1e-3
    trains it fully (``benchmarks/results/finetune_diagnostics_*.txt``). The square interpolates
    between the two measured widths (tiny, 64 wide: 8e-4; 128: 2e-4; 768: 5.6e-6).
    """
    if hidden_size < 1:
        raise ConfigError(f"hidden_size={hidden_size} must be >= 1.")
    return float(min(1e-3, 5e-5 * (256 / hidden_size) ** 2))


def validation_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Carve a stratified validation set from training labels: ``(fit, validation)`` positions.

    Each class gives ``round(fraction × its cells)`` cells, at least one (so validation macro-F1
    sees every class) and never all of them. Returns ``None`` (logged) when ``fraction`` is 0 or a
    class has fewer than 2 cells: the caller then trains on every cell without validation.
    """
    labels = np.asarray(labels)
    if fraction <= 0:
        return None
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2:
        logger.warning(
            "no validation split: a class has %d training cell(s); training without model selection", int(counts.min())
        )
        return None
    take = np.clip(np.rint(fraction * counts).astype(np.int64), 1, counts - 1)
    # A seeded random rank within each class; the first ``take`` of each class validate.
    order = np.random.default_rng(seed).permutation(labels.size)
    by_class = order[np.argsort(inverse[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(labels.size, dtype=np.int64)
    rank[by_class] = np.arange(labels.size) - np.repeat(starts, counts)
    is_val = rank < take[inverse.reshape(-1)]
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def class_weights(
    label_ids: Sequence[int] | np.ndarray, n_classes: int, mode: str = "auto", imbalance_ratio: float = 1.5
) -> np.ndarray | None:
    """Per-class loss weights ``n / (n_classes × count_c)`` (scikit-learn's "balanced"), or ``None``.

    ``"auto"`` weights only when the largest class has more than ``imbalance_ratio`` times the
    cells of the smallest; ``"balanced"`` always; ``"none"`` never.
    """
    if mode not in ("auto", "balanced", "none"):
        raise ConfigError(f"finetune.class_weights={mode!r} is not one of ['auto', 'balanced', 'none'].")
    counts = np.bincount(np.asarray(label_ids, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if mode == "none" or (mode == "auto" and counts.max() <= imbalance_ratio * counts[counts > 0].min()):
        return None
    weights = np.divide(counts.sum(), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)
    return weights.astype(np.float32)


class _PadCollator:
    """Pad a batch of token sequences to its longest cell; labels as int64."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = np.asarray([len(f["input_ids"]) for f in features])
        ids = np.full((len(features), int(lengths.max())), self.pad_id, dtype=np.int64)
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        ids[mask] = np.concatenate([np.asarray(f["input_ids"], dtype=np.int64) for f in features])
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if "labels" in features[0]:
            batch["labels"] = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


@dataclass
class FittedClassifier:
    """A fine-tuned classifier, its classes and its training log."""

    model: Any
    classes: list[str]
    vocab: Any
    medians: Any
    config: ClassifyConfig
    log_history: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def predict(self, dataset: Any, batch_size: int = 64, device: str | None = None) -> Prediction:
        """Class probabilities of every cell of a tokenized corpus (length-sorted batches)."""
        import torch

        from .embed import resolve_device

        torch_device = resolve_device(device or self.config.finetune.device)
        lengths = np.asarray(dataset.with_format("numpy")["length"]) if "length" in dataset.column_names else None
        order = np.argsort(-lengths, kind="stable") if lengths is not None else np.arange(len(dataset))
        collate = _PadCollator(self.vocab.pad_id)
        probabilities = np.zeros((len(dataset), len(self.classes)), dtype=np.float32)
        model = self.model.to(torch_device).eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate([{"input_ids": x} for x in dataset.select(rows)["input_ids"]])
                logits = model(**{k: v.to(torch_device) for k, v in batch.items()}).logits
                probabilities[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return Prediction(_argmax_labels(probabilities, self.classes), probabilities, list(self.classes))

    def save(self, directory: Any, overwrite: bool = False) -> Any:
        """Write ``model/`` (config.json + model.safetensors only), ``vocab.json``, ``medians.tsv``,
        ``config.yaml``, ``training_log.json`` and ``finetune_summary.json`` atomically."""
        from pathlib import Path

        from .config import save_config
        from .fileio import atomic_directory, write_json

        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.model.save_pretrained(tmp / "model", safe_serialization=True)
            self.vocab.save(tmp / "vocab.json")
            if self.medians is not None:
                self.medians.save(tmp / "medians.tsv")
            save_config(self.config, tmp)
            write_json(tmp / "training_log.json", self.log_history)
            write_json(tmp / "finetune_summary.json", self.summary)
        return Path(directory)


def load_classifier(directory: Any) -> FittedClassifier:
    """Load a classifier saved by :meth:`FittedClassifier.save` (safetensors only)."""
    from pathlib import Path

    from .config import load_config
    from .fileio import check_readable_file, read_json
    from .medians import GeneMedians
    from .vocab import Vocabulary

    directory = Path(directory)
    check_readable_file(directory / "model" / "model.safetensors", "classifier weights")
    vocab = Vocabulary.load(check_readable_file(directory / "vocab.json", "classifier vocabulary"))
    model = _classifier_class().from_pretrained(directory / "model", use_safetensors=True)
    medians = GeneMedians.load(directory / "medians.tsv") if (directory / "medians.tsv").exists() else None
    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return FittedClassifier(
        model=model.eval(),
        classes=classes,
        vocab=vocab,
        medians=medians,
        config=load_config(ClassifyConfig, directory / "config.yaml"),
        log_history=read_json(directory / "training_log.json", "training log"),
        summary=read_json(directory / "finetune_summary.json", "fine-tuning summary")
        if (directory / "finetune_summary.json").exists()
        else {},
    )


def fit_classifier(
    task: Task,
    model: Any,
    vocab: Any,
    medians: Any,
    config: ClassifyConfig | None = None,
    train_tokens: TokenizedCells | None = None,
    tokenize_config: Any = None,
    work_dir: Any = None,
    callbacks: Sequence[Any] = (),
) -> FittedClassifier:
    """Fine-tune a classification head (and, per config, the encoder) on the task's training cells.

    Runs on the Hugging Face Trainer (AdamW, linear schedule, warmup ``min(warmup_steps,
    warmup_max_fraction × steps)``). A stratified ``validation_fraction`` of the training cells is
    held out (:func:`validation_split`); the model is evaluated on it every epoch (or every
    ``steps_per_epoch`` steps under ``max_steps``), the checkpoint with the best validation macro-F1
    is restored at the end, and training stops after ``early_stopping_patience`` evaluations
    without a gain. The head learns at its own, higher rate; the loss is class-weighted per
    ``class_weights``. Nothing of the test split is seen. ``work_dir`` receives the Trainer's
    scratch files (a temporary folder by default); ``callbacks`` are extra ``TrainerCallback`` s.
    The result's ``summary`` records the resolved recipe and the validation curve.
    """
    import tempfile

    import torch
    from transformers import EarlyStoppingCallback, TrainingArguments

    from .embed import encoder_of

    config = config or ClassifyConfig()
    ft = config.finetune
    seed = config.labels.seed if ft.seed is None else ft.seed
    if train_tokens is None:
        train_tokens = tokenize_cells(task.train_data, vocab, medians, tokenize_config, _max_len_of(model))
    keep = np.isin(task.train_rows, train_tokens.rows)
    classes = task.classes
    label_ids = pd.Index(classes).get_indexer(task.train_labels[keep])
    dataset = train_tokens.select(task.train_rows[keep]).select_columns(["input_ids"]).add_column("labels", label_ids.tolist())
    split = validation_split(label_ids, ft.validation_fraction, seed)
    train_set, val_set = (dataset, None) if split is None else (dataset.select(split[0]), dataset.select(split[1]))
    first_tokens = np.asarray([ids[0] for ids in train_set["input_ids"]])
    pooling = resolve_pooling(ft.pooling, model, first_tokens, vocab.special_ids)
    classifier = build_classifier(model, classes, vocab, dataclasses.replace(ft, pooling=pooling), seed=seed)
    fit_ids = np.asarray(train_set["labels"])
    weights = class_weights(fit_ids, len(classes), ft.class_weights, ft.imbalance_ratio)
    classifier.loss_weights = None if weights is None else torch.as_tensor(weights)
    learning_rate = ft.learning_rate or default_learning_rate(int(encoder_of(model).config.hidden_size))
    head_learning_rate = ft.head_learning_rate or ft.head_lr_multiplier * learning_rate

    steps_per_epoch = math.ceil(len(train_set) / ft.batch_size)
    total_steps = ft.max_steps if ft.max_steps > 0 else math.ceil(steps_per_epoch * ft.epochs)
    warmup = min(ft.warmup_steps, int(ft.warmup_max_fraction * total_steps))
    eval_steps = max(1, min(steps_per_epoch, total_steps))
    validate = val_set is not None
    summary: dict[str, Any] = {
        "seed": int(seed),
        "n_fit": len(train_set),
        "n_validation": 0 if val_set is None else len(val_set),
        "pooling": pooling,
        "learning_rate": float(learning_rate),
        "head_learning_rate": float(head_learning_rate),
        "warmup_steps": int(warmup),
        "total_steps": int(total_steps),
        "steps_per_epoch": int(steps_per_epoch),
        "class_weights": None if weights is None else dict(zip(classes, map(float, weights), strict=True)),
    }
    with tempfile.TemporaryDirectory(prefix="mixgf-finetune-", dir=work_dir) as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            learning_rate=learning_rate,
            per_device_train_batch_size=ft.batch_size,
            per_device_eval_batch_size=max(64, ft.batch_size),
            num_train_epochs=ft.epochs,
            max_steps=ft.max_steps,
            warmup_steps=warmup,
            weight_decay=ft.weight_decay,
            lr_scheduler_type="linear",
            logging_steps=max(1, min(ft.logging_steps, total_steps)),
            eval_strategy="steps" if validate else "no",
            eval_steps=eval_steps,
            save_strategy="steps" if validate else "no",
            save_steps=eval_steps,
            save_total_limit=1 if validate else None,
            save_only_model=True,
            load_best_model_at_end=validate,
            metric_for_best_model="macro_f1" if validate else None,
            greater_is_better=True,
            report_to=[],
            seed=seed,
            data_seed=seed,
            bf16=ft.bf16,
            use_cpu=(ft.device == "cpu"),
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=ft.device != "cpu" and torch.cuda.is_available(),
            disable_tqdm=True,
        )
        extra = list(callbacks)
        if validate and ft.early_stopping_patience > 0:
            extra.append(EarlyStoppingCallback(early_stopping_patience=ft.early_stopping_patience))
        trainer = _finetune_trainer_class()(
            head_learning_rate=head_learning_rate,
            model=classifier,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=_PadCollator(vocab.pad_id),
            compute_metrics=_validation_metrics if validate else None,
            callbacks=extra,
        )
        trainer.train()
        log_history = list(trainer.state.log_history)
        if validate:
            curve = [
                {"step": int(e["step"]), "epoch": float(e["epoch"]), "macro_f1": float(e["eval_macro_f1"]),
                 "accuracy": float(e["eval_accuracy"]), "loss": float(e["eval_loss"])}
                for e in log_history if "eval_macro_f1" in e
            ]
            best = max(curve, key=lambda e: e["macro_f1"])  # first of equals, as the Trainer keeps it
            summary.update(validation_curve=curve, best_step=best["step"], best_epoch=best["epoch"],
                           best_validation_macro_f1=best["macro_f1"])
        summary["steps_run"] = int(trainer.state.global_step)
    classifier = trainer.model.eval()
    classifier.loss_weights = None
    return FittedClassifier(classifier, classes, vocab, medians, config, log_history, summary)


def _validation_metrics(eval_prediction: Any) -> dict[str, float]:
    """Validation scores the Trainer logs each epoch (model selection uses ``macro_f1``)."""
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    from sklearn.metrics import accuracy_score, f1_score

    y_true, y_pred = np.asarray(eval_prediction.label_ids).astype(np.int64), np.asarray(logits).argmax(axis=-1)
    return {
        # Classes seen in either array, absent predictions scoring 0, as classification_metrics does.
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


_FINETUNE_TRAINER: type | None = None


def _finetune_trainer_class() -> type:
    """A Trainer whose optimizer gives the classification head its own learning rate (built lazily)."""
    global _FINETUNE_TRAINER
    if _FINETUNE_TRAINER is not None:
        return _FINETUNE_TRAINER
    from transformers import Trainer

    class FinetuneTrainer(Trainer):
        """HF Trainer with two learning rates: encoder (``args.learning_rate``) and head."""

        def __init__(self, *args: Any, head_learning_rate: float, **kwargs: Any):
            self.head_learning_rate = head_learning_rate
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model: Any = None) -> Any:
            if self.optimizer is None:
                model = self.model if model is None else model
                decay = set(self.get_decay_parameter_names(model))
                groups = []
                for head in (False, True):
                    for decayed in (True, False):
                        params = [
                            p for n, p in model.named_parameters()
                            if p.requires_grad and n.startswith("classifier.") == head and (n in decay) == decayed
                        ]
                        if params:
                            groups.append({
                                "params": params,
                                "weight_decay": self.args.weight_decay if decayed else 0.0,
                                "lr": self.head_learning_rate if head else self.args.learning_rate,
                            })
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                optimizer_kwargs.pop("lr", None)
                self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
            return self.optimizer

    _FINETUNE_TRAINER = FinetuneTrainer
    return FinetuneTrainer


def finetune(
    task: Task,
    model: Any,
    vocab: Any,
    medians: Any,
    config: ClassifyConfig | None = None,
    tokenize_config: Any = None,
    tokens: tuple[TokenizedCells, TokenizedCells] | None = None,
    method: str = "finetune",
) -> tuple[EvalResult, FittedClassifier]:
    """Fine-tune on the task's training cells and evaluate on its test cells."""
    if tokens is None:
        task, train_tokens, test_tokens = tokenize_task(task, vocab, medians, tokenize_config, _max_len_of(model))
    else:
        train_tokens, test_tokens = tokens
        task = restrict_to_tokenized(task, train_tokens, test_tokens)
    fitted = fit_classifier(task, model, vocab, medians, config, train_tokens=train_tokens)
    prediction = fitted.predict(test_tokens.select(task.test_rows))
    return evaluate(task, prediction, method, finetune=fitted.summary), fitted


# --------------------------------------------------------------------------------------------
# One run: every requested method on one task, and its report folder
# --------------------------------------------------------------------------------------------


@dataclass
class ClassificationRun:
    """Results of every method run on one task (same train / test cells for all)."""

    task: Task
    results: list[EvalResult]
    config: ClassifyConfig
    fitted: FittedClassifier | None = None

    def table(self) -> pd.DataFrame:
        """The benchmark table of this run."""
        return benchmark_table(self.results)


def run_classification(
    adata: Any,
    model: Any = None,
    vocab: Any = None,
    medians: Any = None,
    test: Any = None,
    methods: Sequence[Method] = ("knn", "logreg"),
    baseline_methods: Sequence[BaselineMethod] = (),
    config: ClassifyConfig | None = None,
    tokenize_config: Any = None,
    device: str | None = None,
) -> ClassificationRun:
    """Classify ``adata``'s cells (stratified split), or train on ``adata`` and test on ``test``.

    With ``test`` of another species, labels are matched by canonical name (see the module
    docstring) and count baselines use one-to-one-ortholog genes. ``config.labels.transfer_split``
    trains on ``adata``'s training split and tests on ``test``'s test split (each split as a
    within-dataset run of the same seed would split it).
    """
    from .genes import detect_species

    config = config or ClassifyConfig()
    if methods and model is None:
        raise ConfigError(f"methods {list(methods)} need a model (CLI: --model BUNDLE); or run only baselines.")
    if test is None:
        task = within_task(adata, config.labels)
        species = None
    else:
        species = (detect_species(list(adata.var_names)), detect_species(list(test.var_names)))
        setting = "transfer" if species[0] == species[1] else f"{species[0]}->{species[1]}"
        rows: dict[str, np.ndarray | None] = {"source_rows": None, "target_rows": None}
        if config.labels.transfer_split:
            rows = {
                "source_rows": within_task(adata, config.labels).train_rows,
                "target_rows": within_task(test, config.labels).test_rows,
            }
        task = transfer_task(adata, test, config.labels, setting, synonyms=config.synonyms, **rows)
    for note in task.notes:
        logger.info("%s", note)
    results: list[EvalResult] = []
    fitted = None
    model_methods = [m for m in methods if m in ("knn", "logreg", "finetune")]
    if len(model_methods) != len(methods):
        raise ConfigError(f"methods {list(methods)} must be among ['finetune', 'knn', 'logreg'].")
    if model_methods:
        task, train_tokens, test_tokens = tokenize_task(task, vocab, medians, tokenize_config, _max_len_of(model))
        zero = [m for m in model_methods if m != "finetune"]
        if zero:
            results += zero_shot(task, model, vocab, medians, zero, config.embedding, device=device, tokens=(train_tokens, test_tokens))  # type: ignore[arg-type]
        if "finetune" in model_methods:
            result, fitted = finetune(task, model, vocab, medians, config, tokens=(train_tokens, test_tokens))
            results.append(result)
    if baseline_methods:
        results += baselines(task, baseline_methods, config.baselines, species=species)
    return ClassificationRun(task=task, results=results, config=config, fitted=fitted)


def save_run(run: ClassificationRun, out_dir: Any, overwrite: bool = False) -> Any:
    """Write a run's report folder atomically.

    Contents: ``metrics.csv`` / ``metrics.json`` (the table plus label-handling notes),
    ``per_class_<method>.csv``, ``confusion_<method>.png``, ``predictions.h5ad`` (the test data
    with ``obs["<label>_<method>_pred"]`` / ``_prob``), ``config.yaml`` and, after fine-tuning,
    ``finetuned/`` (the classifier, safetensors only).
    """
    from pathlib import Path

    from .config import save_config, to_dict
    from .fileio import atomic_directory, write_json
    from .plots import confusion_matrix

    task = run.task
    predictions = task.test_data.copy()
    label = run.config.labels.key
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        table = run.table()
        table.to_csv(tmp / "metrics.csv", index=False)
        write_json(
            tmp / "metrics.json",
            {
                "setting": task.setting,
                "n_train": int(task.train_rows.size),
                "n_test": int(task.test_rows.size),
                "classes": task.classes,
                "notes": task.notes,
                "results": table.to_dict(orient="records"),
                "config": to_dict(run.config),
            },
        )
        for result in run.results:
            result.report.to_csv(tmp / f"per_class_{result.method}.csv")
            confusion_matrix(
                result.y_true, result.y_pred, title=f"{task.setting}: {result.method}",
                save=tmp / f"confusion_{result.method}.png",
            )
            write_predictions(predictions, result, key=f"{label}_{result.method}", overwrite=True)
        predictions.write_h5ad(tmp / "predictions.h5ad", compression="gzip")
        save_config(run.config, tmp)
        if run.fitted is not None:
            run.fitted.save(tmp / "finetuned")
    return Path(out_dir)

