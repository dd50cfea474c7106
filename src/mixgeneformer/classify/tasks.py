"""Tasks (which cells train, which are tested) and their tokenized cells."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import InputDataError, check_config
from ..inference import encoder_of
from ..tokenize import tokenize_for_model
from .config import LabelConfig
from .labels import (
    LabelSelection,
    canonical_labels,
    check_unseen_labels,
    match_labels,
    prepare_labels,
    stratified_split,
)

if TYPE_CHECKING:
    import anndata
    import datasets

    from ..medians import GeneMedians
    from ..tokenize import TokenizeConfig
    from ..vocab import Vocabulary

logger = logging.getLogger(__name__)


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


def within_task(adata: anndata.AnnData, config: LabelConfig | None = None, setting: str = "within") -> Task:
    """Stratified train / test split of one labelled dataset (default 80/20, seed 42)."""
    check_config(config, LabelConfig)
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


def tested_rows(adata: anndata.AnnData, config: LabelConfig, seeds: list[int]) -> np.ndarray:
    """Obs positions of the cells that any of ``seeds``' within-dataset splits (``config`` with each
    seed) tests on: what a choice scored on several seeds must not read."""
    rows = [within_task(adata, dataclasses.replace(config, seed=s)).test_rows for s in seeds]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def without_training_rows(task: Task, excluded: np.ndarray, reason: str = "test cells of other seeds") -> Task:
    """``task`` with its training cells at obs positions ``excluded`` left out (a note says how many and why)."""
    keep = ~np.isin(task.train_rows, excluded)
    return dataclasses.replace(task, train_rows=task.train_rows[keep], train_labels=task.train_labels[keep],
                               notes=[*task.notes, f"{int((~keep).sum())} training cells left out: {reason}"])


def transfer_task(
    source: anndata.AnnData,
    target: anndata.AnnData,
    config: LabelConfig | None = None,
    setting: str = "transfer",
    synonyms: Mapping[str, str] | None = None,
    source_rows: np.ndarray | None = None,
    target_rows: np.ndarray | None = None,
) -> Task:
    """Train on ``source``, test on ``target``, on the classes both share.

    Labels are matched by canonical name (:func:`match_labels`), and rare classes (``config``) are
    found on each side after spellings of one class are counted together; labels of the task are
    the canonical names. Source-only classes are dropped; target-only classes follow
    ``config.unseen_test_labels``. ``source_rows`` /
    ``target_rows`` restrict each side to given obs positions (e.g. the source's training split and
    the target's test split, so transfer and within-species numbers share test cells).
    """
    check_config(config, LabelConfig)
    config = config or LabelConfig()

    def side(data: anndata.AnnData, rows: np.ndarray | None) -> LabelSelection:
        selection = prepare_labels(data, config.key, config.min_class_fraction, config.min_class_count,
                                   rename=lambda names: canonical_labels(names, synonyms))
        if rows is not None:
            keep = np.isin(selection.rows, np.asarray(rows))
            selection = dataclasses.replace(selection, rows=selection.rows[keep], labels=selection.labels[keep])
        return selection

    src, tgt = side(source, source_rows), side(target, target_rows)
    match = match_labels(src.labels, tgt.labels, synonyms)
    src_keep = np.isin(src.labels, match.shared)
    tgt_keep = check_unseen_labels(match.shared, tgt.labels, config.unseen_test_labels)
    return Task(
        setting=setting,
        train_data=source,
        train_rows=src.rows[src_keep],
        train_labels=src.labels[src_keep],
        test_data=target,
        test_rows=tgt.rows[tgt_keep],
        test_labels=tgt.labels[tgt_keep],
        notes=[f"source: {src.summary()}", f"target: {tgt.summary()}", match.summary()],
    )


@dataclass
class TokenizedCells:
    """A tokenized corpus of some cells of an AnnData: ``rows[i]`` is the obs position of corpus row i."""

    dataset: Any  # datasets.Dataset with column input_ids
    rows: np.ndarray

    def select(self, obs_rows: np.ndarray) -> datasets.Dataset:
        """The corpus rows of the given obs positions (all must have been tokenized), in that order."""
        position = pd.Index(self.rows).get_indexer(np.asarray(obs_rows))
        if (position < 0).any():
            raise InputDataError(f"{int((position < 0).sum())} requested cells were dropped by the tokenizer.")
        return self.dataset.select(position)


def tokenize_cells(adata: anndata.AnnData, vocab: Vocabulary, medians: GeneMedians | None, tokenize_config: TokenizeConfig | None = None, max_len: int | None = None) -> TokenizedCells:
    """Rank-value tokenize every cell of ``adata`` (input left untouched), remembering obs positions.

    Cells the tokenizer drops (no vocabulary gene) are absent from ``rows``; :func:`restrict_to_tokenized`
    removes them from a task with a count.
    """

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


def tokenize_task(task: Task, vocab: Vocabulary, medians: GeneMedians | None, tokenize_config: TokenizeConfig | None = None, max_len: int | None = None) -> tuple[Task, TokenizedCells, TokenizedCells]:
    """Tokenize the task's data (once when train and test share an AnnData) and drop untokenizable cells."""
    train_tokens = tokenize_cells(task.train_data, vocab, medians, tokenize_config, max_len)
    test_tokens = (
        train_tokens
        if task.test_data is task.train_data
        else tokenize_cells(task.test_data, vocab, medians, tokenize_config, max_len)
    )
    return restrict_to_tokenized(task, train_tokens, test_tokens), train_tokens, test_tokens


def _max_len_of(model: Any) -> int:
    return int(encoder_of(model).config.max_position_embeddings)
