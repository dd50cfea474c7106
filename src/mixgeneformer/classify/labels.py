"""Labels at the door: validation, rare classes, stratified splits, cross-species label matching."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from ..errors import ConfigError, InputDataError, check_anndata

if TYPE_CHECKING:
    import anndata

logger = logging.getLogger(__name__)

MISSING_TEXT = frozenset({"", "nan", "none", "na", "n/a", "null"})
"""Label text that means "no label" (compared stripped, case-insensitively)."""


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


def _obs_of(data: anndata.AnnData | pd.DataFrame) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    check_anndata(data, "data (an AnnData or an obs DataFrame)")
    return data.obs


# long: a 30-line docstring; the body (43 lines) validates one label column.
def prepare_labels(
    data: anndata.AnnData | pd.DataFrame,
    key: str = "cell_type1",
    min_class_fraction: float = 0.005,
    min_class_count: int = 2,
    rename: Callable[[np.ndarray], np.ndarray] | None = None,
) -> LabelSelection:
    """Validate a label column and select the cells and classes to classify.

    Labels are compared as text with surrounding whitespace removed ("beta " is "beta").

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
    rename
        Maps the label texts to the names classes are counted by (e.g. :func:`canonical_labels`, so
        spellings of one class are counted together before rare classes are dropped).

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
    # missing, also as the text a str() conversion or a CSV round trip leaves ("nan", "", "None", "NA")
    missing = (column.isna() | column.astype("string").str.strip().str.lower().isin(MISSING_TEXT)).to_numpy()
    n_missing = int(missing.sum())
    if n_missing:
        logger.warning("%d cells have no %r label (missing, or %s) and are dropped", n_missing, key, sorted(MISSING_TEXT))
    labels = column.astype(object).where(~missing, None).to_numpy()
    labelled = np.flatnonzero(~missing)
    if labelled.size == 0:
        raise InputDataError(f"label column {key!r} has no labels (all {len(obs)} values are missing).")
    names = np.asarray([str(v).strip() for v in labels[labelled]], dtype=object)
    if rename is not None:
        names = np.asarray(rename(names), dtype=object)
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
    return _both_sides(labels, np.sort(train).astype(np.int64), np.sort(test).astype(np.int64), seed)


def _both_sides(labels: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Move one cell of each class a side lacks over from the other side (sklearn's stratified
    split rounds a 2-cell class wholly into training at 20%), so every class is trained and tested."""
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels):
        for source, target in ((0, 1), (1, 0)):
            sides = [train, test]
            if not (labels[sides[target]] == cls).any():
                pool = sides[source][labels[sides[source]] == cls]
                moved = pool[rng.integers(pool.size)]
                sides[source] = sides[source][sides[source] != moved]
                sides[target] = np.sort(np.append(sides[target], moved))
                train, test = sides
    return train, test


def canonical_label(label: str, synonyms: Mapping[str, str] | None = None) -> str:
    """The name labels are matched by: lower-cased, non-alphanumerics -> ``_``, then synonyms.

    Synonyms are followed to their end (``"T cells"`` -> ``t_cells`` -> ``t_cell`` -> a user's
    ``{"t_cell": "immune"}`` -> ``immune``), so every spelling of a class gets one name and a
    canonical name is its own canonical name; a cycle of synonyms is a :class:`ConfigError`.
    """
    name = canonical_label_key(label)
    table = {**LABEL_SYNONYMS, **{canonical_label_key(k): canonical_label_key(v) for k, v in (synonyms or {}).items()}}
    seen = [name]
    while table.get(name, name) != name:
        name = table[name]
        if name in seen:
            raise ConfigError(
                f"the label synonyms form a cycle: {' -> '.join([*seen, name])}. Map each name to one final name "
                "(synonyms=, or the synonyms section of the classify config)."
            )
        seen.append(name)
    return name


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
