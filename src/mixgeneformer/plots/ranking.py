"""Perturbation ranking: horizontal bars of the perturbations with the largest absolute score."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import ConfigError, InputDataError
from .common import _finish, _pick, plain_text

_NAME_COLUMNS = ("symbol", "gene_symbol", "gene", "gene_id", "ensembl_id", "perturbed")  # perturbation bar labels


def _bar_names(results: pd.DataFrame, label_col: str | None, rows: np.ndarray) -> np.ndarray:
    """The name of each of ``rows``: its ``label_col``, a blank or missing one taken from the next
    name column that has one (:data:`_NAME_COLUMNS`), else the row's index."""
    names = results.index[rows].astype(str).to_numpy(dtype=object)
    for col in reversed([c for c in dict.fromkeys([label_col, *_NAME_COLUMNS]) if c in results.columns]):
        values = results[col].iloc[rows].astype("string").str.strip()
        names = np.where((values.notna() & (values != "")).to_numpy(bool), values.to_numpy(dtype=object), names)
    return names


# long: a 19-line docstring; the body checks the columns and draws one bar per gene.
def perturbation_ranking(
    results: pd.DataFrame,
    top: int = 20,
    score: str | None = None,
    label: str | None = None,
    fdr: str | None = None,
    alpha: float = 0.05,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Horizontal bars of the ``top`` perturbations with the largest absolute score, largest at
    the top (ties in table order); positive scores red, negative blue.

    Parameters
    ----------
    results
        One row per perturbed gene (e.g. from :mod:`mixgeneformer.perturb`).
    top
        How many genes to show.
    score, label, fdr
        Column names; auto-detected when None (score: ``shift``, ``mean_shift``,
        ``cosine_shift``, ``score``; label: ``symbol``, ``gene_symbol``, ``gene``, ``gene_id``,
        ``ensembl_id``, ``perturbed``, else the index — a blank label is taken from the next of
        these that has one; fdr: ``fdr``, ``qvalue``, ``padj`` — optional).
    alpha
        Bars with FDR below it are drawn solid and marked ``*``; others hatched.
    """
    if not isinstance(results, pd.DataFrame):
        raise ConfigError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    if results.empty:
        raise InputDataError("the perturbation results are empty; nothing to rank")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ConfigError(f"top must be a whole number >= 1, got {top!r}")
    columns = list(results.columns)
    score_col = _pick(columns, score, ("shift", "mean_shift", "cosine_shift", "score", "effect"), "score")
    label_col = _pick(columns, label, _NAME_COLUMNS, "label", required=False)
    fdr_col = _pick(columns, fdr, ("fdr", "qvalue", "q_value", "padj", "fdr_bh"), "fdr", required=False)

    values = pd.to_numeric(results[score_col], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    if np.isinf(values).any():
        raise InputDataError(f"{score_col!r} has {int(np.isinf(values).sum())} infinite value(s); a bar cannot show them")
    rows = np.flatnonzero(~np.isnan(values))
    if not rows.size:
        raise InputDataError(f"no perturbation has a numeric {score_col!r} (all NaN); nothing to rank")
    rows = rows[np.argsort(-np.abs(values[rows]), kind="stable")][:top]  # by position: an index may repeat
    ranked = results.iloc[rows]
    names, scores = _bar_names(results, label_col, rows), values[rows]
    significant = ((pd.to_numeric(ranked[fdr_col], errors="coerce") < alpha).to_numpy() if fdr_col
                   else np.ones(len(ranked), bool))

    fig = Figure(figsize=(6.5, max(2.5, 0.3 * len(ranked) + 1.2)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(ranked))[::-1]
    colours = np.where(scores >= 0, "#c0392b", "#2c7fb8")
    for yi, s, c, sig in zip(y, scores, colours, significant, strict=True):
        ax.barh(yi, s, color=c if sig else "white", edgecolor=c, hatch=None if sig else "///")
    ax.set_yticks(y, [plain_text(f"{n} *" if (fdr_col and sig) else n) for n, sig in zip(names, significant, strict=True)], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(score_col)
    note = f"; * FDR < {alpha:g} ({fdr_col})" if fdr_col else ""
    ax.set_title(title or f"top {len(ranked)} perturbations by |{score_col}|{note}", fontsize=10)
    return _finish(fig, save)
