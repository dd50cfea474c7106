"""Options of a classification run (saved as config.yaml beside its results)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..config import check_choices
from ..errors import ConfigError

Method = Literal["finetune", "knn", "logreg"]


BaselineMethod = Literal["logreg_counts", "knn_pca", "logreg_tokens"]


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

    def __post_init__(self) -> None:
        _check_positive("embedding", {"batch_size": self.batch_size, "knn_k": self.knn_k, "logreg_c": self.logreg_c})
        check_choices(self, ("pooling",), "embedding")


def _check_positive(section: str, values: dict[str, float]) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{section}.{name}={value} must be > 0.")


@dataclass
class FinetuneConfig:
    """Fine-tuning a classification head (and optionally the encoder) on the HF Trainer.

    The recipe (see :func:`fit_classifier`): a stratified validation split carved from the training
    cells (``validation_fraction``), evaluation every epoch, the checkpoint with the best
    validation macro-F1 kept (early stopping after ``early_stopping_patience`` epochs without a
    gain; ``selection_metric="loss"`` selects and stops on the validation loss instead, which is
    smoother than macro-F1 when a class has only a few validation cells; it is the training objective:
    class-weighted by the fit cells' weights when these apply), class-weighted
    cross-entropy when classes are imbalanced, and learning rates fitted to the model: ``learning_rate=None`` picks :func:`default_learning_rate` of the encoder's width
    (the authors' 5e-5 for their 256-wide model, higher for narrower ones), and the freshly
    initialised head learns at ``head_learning_rate`` (default ``head_lr_multiplier`` × the
    encoder's rate). The warmup is capped at ``warmup_max_fraction`` of all steps.

    ``pooling="auto"`` pools cells the way the model was pretrained (its ``config.pooling``: mean
    over genes, or the ``<cls>`` state when the cells start with one). ``freeze_layers=k`` freezes
    the embeddings and the bottom ``k`` blocks; ``freeze_embeddings`` freezes only the embeddings.
    ``seed`` (default: the split seed ``labels.seed``) seeds the head, dropout, data order and the
    validation split: the same call gives the same model on the same machine.

    ``attention_dropout`` / ``hidden_dropout`` replace the encoder's dropout rates for fine-tuning
    (``None``: as pretrained). Without attention dropout PyTorch's fused attention kernels run:
    fine-tuning the demo's model takes about a third less time on a CPU.

    ``head_init="probe"`` starts the head at the frozen-encoder probe (a logistic regression on the
    pooled embeddings of the fit cells, standardisation folded into the layer; linear probing then
    fine-tuning) and keeps that starting model when no epoch beats its validation score (the
    ``selection_metric``; an epoch that only ties it does not replace it), so the selected model is
    never worse than the probe on the validation cells. ``"random"``: a seeded random head (the usual recipe).

    ``device``: where the classifier is fine-tuned and its test cells predicted (``"cpu"``; None:
    the Trainer's choice, CUDA when available), checked before any cell is tokenized.
    ``max_len`` is kept only so older config files load: the cells' length is the tokenize
    configuration's (``run_classification(max_len=...)``, ``mixgf classify --max-len``), and a
    value here is refused before any work rather than ignored.
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
    head_init: Literal["probe", "random"] = "probe"
    classifier_dropout: float = 0.1
    attention_dropout: float | None = None
    hidden_dropout: float | None = None
    validation_fraction: float = 0.1
    early_stopping_patience: int = 3
    selection_metric: Literal["macro_f1", "loss"] = "macro_f1"
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
        if not (math.isfinite(self.epochs) and self.epochs > 0) and self.max_steps <= 0:
            raise ConfigError(f"finetune.epochs={self.epochs} must be a finite number > 0 (or set finetune.max_steps > 0).")
        if self.logging_steps < 1:
            raise ConfigError(f"finetune.logging_steps={self.logging_steps} must be >= 1 (log every that many steps).")
        for name in ("warmup_steps", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"finetune.{name}={getattr(self, name)} must be >= 0.")
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
        check_choices(self, ("selection_metric", "head_init", "pooling", "class_weights"), "finetune")
        for name in ("classifier_dropout", "attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"finetune.{name}={value} must be in [0, 1) (or null: as pretrained).")
        if self.imbalance_ratio < 1.0:
            raise ConfigError(f"finetune.imbalance_ratio={self.imbalance_ratio} must be >= 1.")
        if not 0.0 <= self.warmup_max_fraction <= 1.0:
            raise ConfigError(f"finetune.warmup_max_fraction={self.warmup_max_fraction} must be in [0, 1].")


@dataclass
class BaselineConfig:
    """Baselines: CellTypist-style logistic regression on counts or on the model's tokens; kNN on count PCA."""

    target_sum: float = 1e4
    clip: float | None = 10.0  # standardised values capped at ±clip (None: not capped)
    logreg_c: float = 1.0
    max_iter: int = 1000
    n_pcs: int = 50
    knn_k: int = 5

    def __post_init__(self) -> None:
        _check_positive("baselines", {
            "target_sum": self.target_sum, "clip": 1.0 if self.clip is None else self.clip, "logreg_c": self.logreg_c,
            "max_iter": self.max_iter, "n_pcs": self.n_pcs, "knn_k": self.knn_k,
        })


@dataclass
class ClassifyConfig:
    """Everything a classification run used; saved as ``config.yaml`` beside its outputs."""

    labels: LabelConfig = field(default_factory=LabelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    synonyms: dict[str, str] = field(default_factory=dict)
