"""Zero-shot classification on frozen embeddings: kNN (cosine) and logistic regression."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from ..errors import ConfigError, InputDataError, name_list
from ..inference import check_embed_options, embed_corpus
from .config import EmbeddingConfig
from .metrics import EvalResult, Prediction, _argmax_labels, evaluate
from .tasks import Task, TokenizedCells, _max_len_of, restrict_to_tokenized, tokenize_task

if TYPE_CHECKING:
    import torch

    from ..medians import GeneMedians
    from ..tokenize import TokenizeConfig
    from ..vocab import Vocabulary


def knn_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 5, metric: str = "cosine"
) -> Prediction:
    """k-nearest-neighbour vote (default k=5, cosine), the zero-shot protocol of the paper."""

    k = min(k, len(train_y))
    model = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute")
    model.fit(np.asarray(train_x), np.asarray(train_y, dtype=object))
    proba = model.predict_proba(np.asarray(test_x))
    classes = [str(c) for c in model.classes_]
    return Prediction(labels=_argmax_labels(proba, classes), probabilities=proba, classes=classes)


@dataclass
class StandardizedLogReg:
    """A fitted logistic regression and the standardisation of its inputs (``mean`` / ``std`` of the
    training cells; 0 / 1 without standardisation; values capped at ``±clip`` after it)."""

    model: LogisticRegression
    mean: np.ndarray
    std: np.ndarray
    clip: float | None = None

    def transform(self, x: np.ndarray | sp.spmatrix) -> np.ndarray:
        out = (_dense(x) - self.mean) / self.std
        if self.clip is not None:
            np.clip(out, -self.clip, self.clip, out=out)
        return out

    def predict_proba(self, x: np.ndarray | sp.spmatrix) -> np.ndarray:
        return self.model.predict_proba(self.transform(x))


def fit_logreg(
    train_x: np.ndarray | sp.spmatrix,
    train_y: np.ndarray,
    *,
    c: float = 1.0,
    max_iter: int = 1000,
    standardize: bool = True,
    clip: float | None = None,
    seed: int = 0,
    class_weight: str | None = None,
) -> StandardizedLogReg:
    """L2 logistic regression (multinomial, lbfgs) on features standardised on the training cells.

    ``clip`` caps standardised values at ``±clip`` (CellTypist caps at 10). The one fit behind
    :func:`logreg_predict` and the fine-tuning head's probe start (``classify.recipe``).
    """
    train_x = _dense(train_x)
    mean, std = np.zeros(train_x.shape[1], dtype=train_x.dtype), np.ones(train_x.shape[1], dtype=train_x.dtype)
    if standardize:
        mean = train_x.mean(axis=0)
        std = train_x.std(axis=0)
        std[std == 0] = 1.0
    fitted = StandardizedLogReg(LogisticRegression(C=c, max_iter=max_iter, random_state=seed, class_weight=class_weight),
                                mean, std, clip if standardize else None)
    fitted.model.fit(fitted.transform(train_x), train_y)
    return fitted


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
    """:func:`fit_logreg` on the training cells, class probabilities of the test cells."""
    fitted = fit_logreg(train_x, np.asarray(train_y, dtype=object), c=c, max_iter=max_iter, standardize=standardize,
                        clip=clip, seed=seed)
    proba = fitted.predict_proba(test_x)
    classes = [str(cl) for cl in fitted.model.classes_]
    return Prediction(labels=_argmax_labels(proba, classes), probabilities=proba, classes=classes)


def _dense(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


ZERO_SHOT_METHODS = ("knn", "logreg")


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
    raise ConfigError(f"zero-shot method {method!r} is not one of {list(ZERO_SHOT_METHODS)}.")


def zero_shot(
    task: Task,
    model: torch.nn.Module,
    vocab: Vocabulary,
    medians: GeneMedians | None,
    methods: Sequence[Literal["knn", "logreg"]] = ("knn", "logreg"),
    config: EmbeddingConfig | None = None,
    tokenize_config: TokenizeConfig | None = None,
    device: str | None = None,
    tokens: tuple[TokenizedCells, TokenizedCells] | None = None,
) -> list[EvalResult]:
    """Classify with kNN / logistic regression on frozen cell embeddings of ``model``.

    Every model is embedded the same way (``config.layer``, default the second-to-last layer;
    ``config.pooling``, default mean over genes), the fair protocol of SPEC §5. ``methods``,
    ``config`` and ``device`` are checked before any cell is tokenized or embedded.
    """

    config = config or EmbeddingConfig()
    methods = name_list(methods, "methods")  # one name given as a string is that method
    unknown = [m for m in methods if m not in ZERO_SHOT_METHODS]
    if unknown or not methods:
        raise ConfigError(f"zero-shot methods {list(methods)} must be one or more of {list(ZERO_SHOT_METHODS)}.")
    check_embed_options(config.pooling, config.batch_size, "auto", device)
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
