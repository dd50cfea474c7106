"""Cell-type classification: fine-tuning, zero-shot kNN / logistic regression, transfer, baselines.

The flow every method shares:

1. :func:`prepare_labels` validates the label column once, at the door (RELIABILITY 11): a missing
   column lists the obs columns, NaN labels are dropped and counted, rare classes are dropped
   (default: under 0.5% of labelled cells, as the Mix-Geneformer authors do), one class is an error.
2. A :class:`Task` says which cells train and which are tested: :func:`within_task` makes a
   stratified 80/20 split (seed 42); :func:`transfer_task` trains on one species and tests on the
   other, on the labels both share after :func:`match_labels`.
3. A method predicts the test cells: fine-tuning (:func:`fit_classifier`), zero-shot on frozen
   embeddings (:func:`zero_shot`), or a baseline (:func:`baselines` on counts, :func:`token_baseline` on the model's tokens).
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

from .baselines import (
    align_genes,
    baseline_predict,
    baselines,
    log_normalize,
    ortholog_columns,
    ortholog_counts,
    token_bag,
    token_baseline,
)
from .config import (
    BaselineConfig,
    BaselineMethod,
    ClassifyConfig,
    EmbeddingConfig,
    FinetuneConfig,
    LabelConfig,
    Method,
)
from .files import classify_file
from .finetune import FittedClassifier, build_classifier, finetune, fit_classifier, load_classifier
from .labels import (
    LABEL_SYNONYMS,
    LabelMatch,
    LabelSelection,
    canonical_label,
    canonical_label_key,
    canonical_labels,
    check_unseen_labels,
    match_labels,
    prepare_labels,
    stratified_split,
)
from .metrics import (
    METRIC_COLUMNS,
    EvalResult,
    Prediction,
    benchmark_table,
    classification_metrics,
    evaluate,
    markdown_table,
    mean_sd_text,
    per_class_report,
    seed_summary,
    write_predictions,
)
from .predict import predict_cells, predict_sharded
from .recipe import class_weights, default_learning_rate, resolve_pooling, validation_split
from .run import ClassificationRun, run_classification, save_run
from .tasks import (
    Task,
    TokenizedCells,
    restrict_to_tokenized,
    tested_rows,
    tokenize_cells,
    tokenize_task,
    transfer_task,
    within_task,
    without_training_rows,
)
from .zeroshot import (
    StandardizedLogReg,
    fit_logreg,
    knn_predict,
    logreg_predict,
    zero_shot,
    zero_shot_predict,
)

__all__ = [
    "BaselineConfig",
    "BaselineMethod",
    "ClassificationRun",
    "ClassifyConfig",
    "EmbeddingConfig",
    "StandardizedLogReg",
    "EvalResult",
    "FinetuneConfig",
    "FittedClassifier",
    "LABEL_SYNONYMS",
    "LabelConfig",
    "LabelMatch",
    "LabelSelection",
    "METRIC_COLUMNS",
    "Method",
    "Prediction",
    "Task",
    "TokenizedCells",
    "align_genes",
    "baseline_predict",
    "baselines",
    "benchmark_table",
    "build_classifier",
    "canonical_label",
    "canonical_label_key",
    "canonical_labels",
    "check_unseen_labels",
    "class_weights",
    "classification_metrics",
    "classify_file",
    "default_learning_rate",
    "evaluate",
    "finetune",
    "fit_classifier",
    "knn_predict",
    "load_classifier",
    "predict_cells",
    "predict_sharded",
    "log_normalize",
    "ortholog_columns",
    "fit_logreg",
    "logreg_predict",
    "markdown_table",
    "match_labels",
    "ortholog_counts",
    "per_class_report",
    "prepare_labels",
    "resolve_pooling",
    "restrict_to_tokenized",
    "run_classification",
    "token_bag",
    "token_baseline",
    "save_run",
    "mean_sd_text",
    "seed_summary",
    "stratified_split",
    "tested_rows",
    "tokenize_cells",
    "tokenize_task",
    "transfer_task",
    "validation_split",
    "within_task",
    "without_training_rows",
    "write_predictions",
    "zero_shot",
    "zero_shot_predict",
]
