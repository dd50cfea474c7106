"""The fine-tuning recipe: validation split, class weights, learning rates, pooling, two-rate Trainer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import Trainer

from ..errors import ConfigError
from ..inference import check_batch_size, encoder_of, length_order, pad_batch
from ..model import MixGeneformerForCellClassification
from .zeroshot import fit_logreg

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import EvalPrediction

logger = logging.getLogger(__name__)


def resolve_pooling(
    pooling: str,
    model: torch.nn.Module,
    first_tokens: np.ndarray | None = None,
    special_ids: Sequence[int] | np.ndarray | None = None,
    cls_id: int | None = None,
) -> str:
    """The cell pooling of a classifier: ``"mean"`` / ``"cls"`` as given; ``"auto"`` follows pretraining.

    ``"auto"``: a model pretrained with ``cls`` or ``pooler`` pooling (the state at position 0) is
    pooled at ``<cls>`` when every cell starts with ``<cls>`` (``first_tokens``, when given, checked
    against ``cls_id``; without it, against any of ``special_ids``), otherwise (and for ``mean``
    pretraining) by the mean over genes. Cells that start with a species token (V1 style with
    ``add_species_token``) have no ``<cls>`` state: the mean over genes.
    """
    if pooling in ("mean", "cls"):
        return pooling
    if pooling != "auto":
        raise ConfigError(f"finetune.pooling={pooling!r} is not one of ['auto', 'mean', 'cls'].")
    pretrained = getattr(getattr(model, "config", None), "pooling", None) or getattr(
        encoder_of(model).config, "pooling", "mean"
    )
    if pretrained not in ("cls", "pooler"):
        return "mean"
    if first_tokens is not None and (cls_id is not None or special_ids is not None):
        allowed = np.asarray([cls_id] if cls_id is not None else special_ids)
        if not np.isin(np.asarray(first_tokens), allowed).all():
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


def validation_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """Validation scores the Trainer logs each epoch (model selection uses ``macro_f1``)."""
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    y_true, y_pred = np.asarray(eval_prediction.label_ids).astype(np.int64), np.asarray(logits).argmax(axis=-1)
    return {
        # Classes seen in either array, absent predictions scoring 0, as classification_metrics does.
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


#: Per validation score that selects a fine-tuned model: whether higher is better.
GREATER_IS_BETTER = {"macro_f1": True, "loss": False}


def beats(score: dict[str, float], reference: dict[str, float], metric: str) -> bool:
    """Whether validation ``score`` is strictly better than ``reference`` by ``metric`` (macro-F1 up, loss down)."""
    return score[metric] > reference[metric] if GREATER_IS_BETTER[metric] else score[metric] < reference[metric]


def validation_summary(log_history: list[dict[str, Any]], metric: str = "macro_f1") -> dict[str, Any]:
    """The validation curve of a Trainer log and its best evaluation by ``metric`` (``"macro_f1"``,
    highest, or ``"loss"``, lowest; the first of equals, as the Trainer keeps it)."""
    curve = [
        {
            "step": int(e["step"]),
            "epoch": float(e["epoch"]),
            "macro_f1": float(e["eval_macro_f1"]),
            "accuracy": float(e["eval_accuracy"]),
            "loss": float(e["eval_loss"]),
        }
        for e in log_history
        if "eval_macro_f1" in e
    ]
    best = curve[0]
    for evaluation in curve[1:]:
        if beats(evaluation, best, metric):
            best = evaluation
    return {
        "validation_curve": curve,
        "best_step": best["step"],
        "best_epoch": best["epoch"],
        "best_validation_macro_f1": best["macro_f1"],
        "best_validation_loss": best["loss"],
    }


class PadCollator:
    """Pad a batch of token sequences to its longest cell; labels as int64."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = np.asarray([len(f["input_ids"]) for f in features], dtype=np.int64)
        flat = np.concatenate([np.asarray(f["input_ids"], dtype=np.int64) for f in features])
        ids, mask = pad_batch(flat, np.cumsum(lengths) - lengths, lengths, self.pad_id)
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if "labels" in features[0]:
            batch["labels"] = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


def pooled_features(classifier: MixGeneformerForCellClassification, dataset: Dataset, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """The classifier's pooled cell embeddings of every cell of ``dataset`` (eval mode, on the
    classifier's device; batches read one at a time, in length order when the dataset has a ``length``
    column)."""
    check_batch_size(batch_size)
    lengths = np.asarray(dataset.with_format("numpy")["length"]) if "length" in dataset.column_names else None
    order = length_order(lengths) if lengths is not None else np.arange(len(dataset))
    device = next(classifier.parameters()).device
    collate = PadCollator(pad_id)
    features = np.zeros((len(dataset), classifier.config.hidden_size), dtype=np.float32)
    was_training = classifier.training
    classifier.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate([{"input_ids": x} for x in dataset.select(rows)["input_ids"]])
            pooled = classifier.cell_embeddings(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            features[rows] = pooled.float().cpu().numpy()
    classifier.train(was_training)
    return features


def init_head_from_probe(
    classifier: MixGeneformerForCellClassification, fit_set: Dataset, pad_id: int, balanced: bool, seed: int
) -> None:
    """Set the head to a logistic-regression probe on the frozen pooled embeddings of ``fit_set``.

    The probe is :func:`mixgeneformer.classify.fit_logreg` (standardised features, as
    :func:`~mixgeneformer.classify.logreg_predict`); the standardisation is folded into the linear
    layer, so the classifier's logits at the start of fine-tuning are the probe's. Classes absent
    from the fit cells get a low bias.
    """
    x = pooled_features(classifier, fit_set, pad_id)
    y = np.asarray(fit_set["labels"], dtype=np.int64)
    probe = fit_logreg(x, y, seed=seed, class_weight="balanced" if balanced else None)
    mean, std, model = probe.mean, probe.std, probe.model
    n_classes, coef = classifier.config.num_labels, model.coef_
    if coef.shape[0] == 1:  # sklearn's binary form: one row for class 1
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-model.intercept_[0] / 2, model.intercept_[0] / 2])
    else:
        intercept = model.intercept_
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, intercept.min() - 10.0)
    weight[model.classes_] = coef / std
    bias[model.classes_] = intercept - (coef / std) @ mean
    with torch.no_grad():
        classifier.classifier.weight.copy_(torch.as_tensor(weight, dtype=classifier.classifier.weight.dtype))
        classifier.classifier.bias.copy_(torch.as_tensor(bias, dtype=classifier.classifier.bias.dtype))


class FinetuneTrainer(Trainer):
    """HF Trainer with two learning rates: encoder (``args.learning_rate``) and the ``classifier.*`` head."""

    def __init__(self, *args: Any, head_learning_rate: float, **kwargs: Any):
        self.head_learning_rate = head_learning_rate
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            groups = []
            for head in (False, True):
                for decayed in (True, False):
                    params = [
                        p
                        for n, p in model.named_parameters()
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
