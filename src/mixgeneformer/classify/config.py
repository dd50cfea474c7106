"""Options of a classification run (saved as config.yaml beside its results)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError

Method = Literal["finetune", "knn", "logreg"]


BaselineMethod = Literal["logreg_counts", "knn_pca"]


@dataclass
class LabelConfig:
    """Which cells and classes take part.

    ``min_class_fraction`` drops classes under that fraction of labelled cells (the authors' 0.5%);
    ``min_class_count`` drops classes with fewer cells (at least 2 are needed to stratify).
    ``unseen_test_labels``: test cells whose label training never saw (a separate test set) are
    dropped and reported (``"drop"``, the default) or raise an error (``"error"``).
    """

    key: str = "cell_type1"
    min_class_fraction: float = 0.005
    min_class_count: int = 2
    test_size: float = 0.2
    seed: int = 42
    unseen_test_labels: Literal["error", "drop"] = "drop"

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

    Defaults follow the authors (lr 5e-5, batch 12, warmup 500, 10 epochs); the warmup is capped at
    ``warmup_max_fraction`` of all steps so small data sets still reach the peak learning rate.
    """

    learning_rate: float = 5e-5
    batch_size: int = 12
    epochs: float = 10.0
    max_steps: int = -1
    warmup_steps: int = 500
    warmup_max_fraction: float = 0.1
    weight_decay: float = 0.001
    train_encoder: bool = True
    freeze_layers: int = 0
    pooling: Literal["mean", "cls"] = "mean"
    classifier_dropout: float = 0.1
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
