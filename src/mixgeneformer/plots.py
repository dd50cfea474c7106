"""Figures: UMAP of embeddings, confusion matrices, perturbation rankings, training curves.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, so it is
safe on headless machines and in loops), returns it, and writes it atomically when ``save`` is
given (format from the file suffix; PNG at 150 dpi by default).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .errors import ConfigError, InputDataError
from .fileio import atomic_file, check_readable_file
from .filekinds import figure_metadata

if TYPE_CHECKING:
    import anndata
    from numpy.typing import ArrayLike

__all__ = ["confusion_matrix", "perturbation_ranking", "save_figure", "training_curves", "umap"]


def plain_text(value: object) -> str:
    """``value`` as literal figure text: matplotlib reads ``$...$`` as math (and fails on bad TeX)."""
    return str(value).replace("$", r"\$")


_MAX_LEGEND = 30  # beyond this many categories a legend is unreadable; colour without it


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` atomically; the format follows the suffix (png, pdf, svg...)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ConfigError(
            f"cannot save a figure as {path.name!r}: unknown format {fmt!r}; use one of "
            f"{sorted(fig.canvas.get_supported_filetypes())}"
        )
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format=fmt, dpi=dpi, bbox_inches="tight", metadata=figure_metadata(fmt))
    return path


def _finish(fig: Figure, save: str | os.PathLike | None) -> Figure:
    if save is not None:
        save_figure(fig, save)
    return fig


# --------------------------------------------------------------------------------------------
# UMAP
# --------------------------------------------------------------------------------------------
def _annotation(data: Any, value: Any, n: int, what: str) -> tuple[str, np.ndarray] | None:
    """(name, values) of a colouring: an obs column name (AnnData) or an array-like of length n."""
    if value is None:
        return None
    if isinstance(value, str):
        obs = getattr(data, "obs", None)
        if obs is None:
            raise ConfigError(f"{what}={value!r} names an obs column, but the input is an array; pass the labels themselves")
        if value not in obs.columns:
            raise ConfigError(f"{what}={value!r} is not an obs column; available: {list(obs.columns)}")
        return value, obs[value].to_numpy()
    values = np.asarray(value)
    if values.shape != (n,):
        raise ConfigError(f"{what} has shape {values.shape}, expected one label per cell ({n},)")
    return what, values


MIN_UMAP_CELLS = 4  # fewer: umap-learn's spectral layout fails
EXACT_KNN_MAX_CELLS = 20_000  # brute-force neighbours below this many cells (UMAP figures)


def umap_coordinates(
    embeddings: np.ndarray,
    n_neighbors: int = 15,
    min_dist: float = 0.3,
    metric: str = "cosine",
    random_state: int | None = 0,
) -> np.ndarray:
    """2-D UMAP (umap-learn) of the rows of ``embeddings``; float32 (n, 2).

    Up to :data:`EXACT_KNN_MAX_CELLS` cells, and for metrics scikit-learn's brute-force search
    knows, the neighbour graph is computed exactly by scikit-learn and handed to umap-learn
    (``precomputed_knn``), which skips compiling and running its approximate search: about 10 s
    less for the demo's 3,000 cells on CPU. Other metrics (umap-learn's own) use umap-learn's search.
    """
    import umap as umap_learn  # lazy: importing umap-learn compiles numba code (seconds) at import
    from sklearn.neighbors import VALID_METRICS, NearestNeighbors

    x = np.asarray(embeddings, dtype=np.float32)
    n = x.shape[0]
    if n < MIN_UMAP_CELLS:  # umap-learn's spectral layout fails on 3 points (a scipy TypeError)
        raise InputDataError(f"UMAP needs at least {MIN_UMAP_CELLS} cells with a finite embedding, got {n}")
    k = min(n_neighbors, n - 1)
    knn = (None, None, None)
    if n <= EXACT_KNN_MAX_CELLS and metric in VALID_METRICS["brute"]:
        distances, indices = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(x).kneighbors(x)
        knn = (indices, distances.astype(np.float32), None)
    reducer = umap_learn.UMAP(
        n_neighbors=k,
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
        n_jobs=1 if random_state is not None else -1,
        precomputed_knn=knn,
    )
    with warnings.catch_warnings():  # the figure never calls reducer.transform, which a precomputed graph disables
        warnings.filterwarnings("ignore", message="precomputed_knn", category=UserWarning)
        return reducer.fit_transform(x).astype(np.float32)


def category_colours(n: int) -> list[tuple[float, ...]]:
    """``n`` distinct colours: tab10 up to 10, tab20 up to 20, tab20 + tab20b + tab20c up to 60, else
    ``n`` evenly spaced hues of turbo (tab20 alone repeated from the 21st category: two types, one colour)."""
    if n <= 20:
        return [matplotlib.colormaps["tab10" if n <= 10 else "tab20"](i) for i in range(n)]
    if n <= 60:
        return [matplotlib.colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)][:n]
    return [tuple(c) for c in matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, n))]


def _scatter(ax: Any, coords: np.ndarray, labels: np.ndarray, name: str, point_size: float) -> None:
    if labels.dtype.kind in "fiu" and len(np.unique(labels[~pd.isna(labels)])) > _MAX_LEGEND:
        points = ax.scatter(coords[:, 0], coords[:, 1], c=labels, s=point_size, cmap="viridis", linewidths=0)
        ax.figure.colorbar(points, ax=ax, label=name)
    else:
        labels = pd.Series(labels).astype("string").fillna("NA").to_numpy()
        categories = sorted(set(labels))
        colours = category_colours(len(categories))
        for i, category in enumerate(categories):
            chosen = labels == category
            ax.scatter(
                coords[chosen, 0], coords[chosen, 1], s=point_size, linewidths=0,
                color=colours[i], label=plain_text(f"{category} ({int(chosen.sum())})"),
            )
        if len(categories) <= _MAX_LEGEND:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3, frameon=False)
    ax.set_title(name)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])


# long: a 25-line docstring; the body (29 lines) draws one panel per annotation.
def umap(
    data: anndata.AnnData | np.ndarray,
    color: str | ArrayLike | None = None,
    species: str | ArrayLike | None = None,
    key: str = "X_mixgeneformer",
    n_neighbors: int = 15,
    min_dist: float = 0.3,
    metric: str = "cosine",
    random_state: int | None = 0,
    title: str | None = None,
    point_size: float | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """UMAP of cell embeddings, coloured by a label and (side by side) by species.

    Parameters
    ----------
    data
        An AnnData (embeddings from ``obsm[key]``) or an (n_cells, dim) array.
    color, species
        With AnnData: obs column names; with an array: one value per cell. Each given
        annotation gets its own panel. With AnnData and ``species=None``, a column named
        ``species`` or ``organism`` is used when present.
    key
        ``obsm`` key of the embeddings (AnnData input only).
    n_neighbors, min_dist, metric, random_state
        Passed to ``umap.UMAP``.
    title
        Figure title.
    point_size
        Marker area; default scales with the number of cells.
    save
        Optional output path (png, pdf, svg...).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if hasattr(data, "obsm"):
        if key not in data.obsm:
            raise ConfigError(f"obsm[{key!r}] not found; available keys: {list(data.obsm.keys())}. Run embed first")
        embeddings = np.asarray(data.obsm[key], dtype=np.float32)
        if species is None:
            species = next((c for c in ("species", "organism") if c in data.obs.columns), None)
    else:
        embeddings = np.asarray(data, dtype=np.float32)
    if embeddings.ndim != 2:
        raise InputDataError(f"embeddings must be 2-D (cells x dims), got shape {embeddings.shape}")
    n = embeddings.shape[0]
    panels = [p for p in (_annotation(data, color, n, "color"), _annotation(data, species, n, "species")) if p]
    if not panels:
        panels = [("cells", np.full(n, "all"))]

    finite = np.isfinite(embeddings).all(axis=1)  # rows of cells the tokenizer dropped are NaN
    coords = umap_coordinates(embeddings[finite], n_neighbors, min_dist, metric, random_state)
    size = point_size if point_size is not None else float(np.clip(3000 / max(finite.sum(), 1), 1, 30))

    fig = Figure(figsize=(5.5 * len(panels) + 1.5, 5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, values) in zip(axes, panels, strict=True):
        _scatter(ax, coords, values[finite], name, size)
    dropped = int((~finite).sum())
    suptitle = title or "UMAP"
    if dropped:
        suptitle += f" ({dropped} cells without embedding not shown)"
    fig.suptitle(suptitle)
    return _finish(fig, save)


# --------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------
def _matrix_in_order(matrix: pd.DataFrame, labels: list[object]) -> np.ndarray:
    """The counts of a DataFrame confusion matrix with rows and columns both in ``labels``' order
    (by name: a table whose columns are in another order than its index, or a ``labels=`` order,
    was drawn as stored, its counts under the wrong classes)."""
    if set(matrix.columns) != set(matrix.index):
        raise InputDataError(
            f"matrix must have the same classes as rows (true) and columns (predicted); rows {list(matrix.index)}, "
            f"columns {list(matrix.columns)}"
        )
    if set(labels) != set(matrix.index) or len(labels) != len(set(labels)):
        raise InputDataError(f"labels {labels} must name each class of the matrix once; the matrix has {list(matrix.index)}")
    return matrix.reindex(index=labels, columns=labels).to_numpy(dtype=np.float64)


# long: a 17-line docstring; the body annotates every cell of the matrix.
def confusion_matrix(
    y_true: ArrayLike | None = None,
    y_pred: ArrayLike | None = None,
    *,
    labels: Iterable[object] | None = None,
    matrix: np.ndarray | pd.DataFrame | None = None,
    normalize: bool = True,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Confusion matrix heat map, rows = true class, normalized per row by default.

    Parameters
    ----------
    y_true, y_pred
        True and predicted labels (same length). Ignored when ``matrix`` is given.
    labels
        Class order; default: sorted union of both label sets (or the matrix' index). With a
        DataFrame ``matrix``, its classes in the order to draw (rows and columns are matched by name).
    matrix
        A precomputed count matrix (rows true, columns predicted), e.g. a DataFrame indexed by
        class with the same classes as columns (in any order).
    normalize
        Show row fractions (each true class sums to 1); counts otherwise. Row totals are shown
        in the y tick labels either way.
    title, save
        Figure title; optional output path.
    """
    if matrix is not None:
        if isinstance(matrix, pd.DataFrame):
            labels = list(matrix.index) if labels is None else list(labels)
            counts = _matrix_in_order(matrix, labels)
        else:
            counts = np.asarray(matrix, dtype=np.float64)
            labels = list(range(counts.shape[0])) if labels is None else list(labels)
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(labels):
            raise InputDataError(f"matrix must be square with one row per label; got {counts.shape} for {len(labels)} labels")
    else:
        if y_true is None or y_pred is None:
            raise ConfigError("pass y_true and y_pred, or matrix=")
        true = pd.Series(np.asarray(y_true)).astype("string")
        pred = pd.Series(np.asarray(y_pred)).astype("string")
        if len(true) != len(pred):
            raise InputDataError(f"y_true has {len(true)} labels but y_pred has {len(pred)}")
        labels = sorted(set(true.dropna()) | set(pred.dropna())) if labels is None else [str(x) for x in labels]
        position = {label: i for i, label in enumerate(labels)}
        t = true.map(position).to_numpy(dtype=np.float64)
        p = pred.map(position).to_numpy(dtype=np.float64)
        ok = ~(np.isnan(t) | np.isnan(p))
        counts = np.zeros((len(labels), len(labels)))
        np.add.at(counts, (t[ok].astype(np.int64), p[ok].astype(np.int64)), 1)
    if not len(labels):
        raise InputDataError("the confusion matrix has no class: no cell has both a true and a predicted label")

    totals = counts.sum(axis=1)
    shown = counts / np.where(totals > 0, totals, 1)[:, None] if normalize else counts
    k = len(labels)
    side = max(4.0, 0.45 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "cells")
    ax.set_xticks(range(k), [plain_text(x) for x in labels], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), [plain_text(f"{x} (n={int(n)})") for x, n in zip(labels, totals, strict=True)], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 25:
        threshold = 0.5 * (shown.max() if shown.size else 1)
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    text = f"{shown[i, j]:.2f}" if normalize else f"{int(counts[i, j])}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if shown[i, j] > threshold else "black")
    ax.set_title(title or ("confusion matrix (row-normalized)" if normalize else "confusion matrix"))
    return _finish(fig, save)


# --------------------------------------------------------------------------------------------
# Perturbation ranking
# --------------------------------------------------------------------------------------------
def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, required: bool = True) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(f"{what} column {wanted!r} not in the results; columns: {list(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    if required:
        raise ConfigError(f"no {what} column found (looked for {list(candidates)}); pass {what}= one of {list(columns)}")
    return None


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
    """Horizontal bars of the ``top`` perturbations with the largest absolute score.

    Parameters
    ----------
    results
        One row per perturbed gene (e.g. from :mod:`mixgeneformer.perturb`).
    top
        How many genes to show.
    score, label, fdr
        Column names; auto-detected when None (score: ``shift``, ``mean_shift``,
        ``cosine_shift``, ``score``; label: ``symbol``, ``gene_symbol``, ``gene``, ``gene_id``,
        else the index; fdr: ``fdr``, ``qvalue``, ``padj`` — optional).
    alpha
        Bars with FDR below it are drawn solid and marked ``*``; others hatched.
    """
    if not isinstance(results, pd.DataFrame):
        raise ConfigError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    if results.empty:
        raise InputDataError("the perturbation results are empty; nothing to rank")
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    columns = list(results.columns)
    score_col = _pick(columns, score, ("shift", "mean_shift", "cosine_shift", "score", "effect"), "score")
    label_col = _pick(columns, label, ("symbol", "gene_symbol", "gene", "gene_id", "ensembl_id"), "label", required=False)
    fdr_col = _pick(columns, fdr, ("fdr", "qvalue", "q_value", "padj", "fdr_bh"), "fdr", required=False)

    values = pd.to_numeric(results[score_col], errors="coerce")
    ranked = results.assign(_score=values).dropna(subset=["_score"])
    if ranked.empty:
        raise InputDataError(f"no perturbation has a numeric {score_col!r} (all NaN); nothing to rank")
    ranked = ranked.reindex(ranked["_score"].abs().sort_values(ascending=False).index).head(top)
    names = (ranked[label_col] if label_col else pd.Series(ranked.index, index=ranked.index)).astype(str).to_numpy()
    scores = ranked["_score"].to_numpy(dtype=np.float64)
    significant = (
        (pd.to_numeric(ranked[fdr_col], errors="coerce") < alpha).to_numpy() if fdr_col else np.ones(len(ranked), bool)
    )

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


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------
def _plot_series(ax: Any, table: pd.DataFrame, steps: pd.Series, columns: list[Any], step_col: str, ylabel: str, title: str) -> None:
    """One panel: a line per column against the step (NaN cells skipped); baselines (``unigram``) dashed."""
    for col in columns:
        values = pd.to_numeric(table[col], errors="coerce")
        ok = values.notna() & steps.notna()
        if ok.any():
            style = "--" if "unigram" in str(col) else "-"
            ax.plot(steps[ok], values[ok], style, label=col, marker="o" if ok.sum() < 30 else None, markersize=3)
    ax.set_xlabel(step_col)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)


def training_curves(
    metrics: str | os.PathLike | pd.DataFrame,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Loss parts and learning rate against the optimizer step.

    Parameters
    ----------
    metrics
        A CSV path or DataFrame with a step column (``step`` or ``global_step``), one or more
        loss columns (any name containing ``loss``) and optionally a learning-rate column
        (``lr`` or ``learning_rate``). Empty cells (metrics logged at other steps) are skipped
        per series. Held-out accuracies (``eval_top1`` / ``eval_top10`` and the baselines'
        ``eval_*unigram_top*``, from :mod:`mixgeneformer.diagnostics`) get a panel of their own;
        baseline series (names containing ``unigram``) are drawn dashed.
    """
    if isinstance(metrics, pd.DataFrame):
        table = metrics
    else:
        path = check_readable_file(metrics, "metrics CSV")
        try:
            table = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            raise InputDataError(f"metrics CSV {path} cannot be parsed ({exc}); is it truncated?") from exc
    columns = list(table.columns)
    step_col = _pick(columns, None, ("step", "global_step", "steps"), "step")
    loss_cols = [c for c in columns if "loss" in str(c).lower()]
    lr_col = _pick(columns, None, ("lr", "learning_rate"), "learning rate", required=False)
    if not loss_cols:
        raise InputDataError(f"no loss column in the metrics (looked for names containing 'loss'); columns: {columns}")

    accuracy_cols = [c for c in columns if str(c).startswith("eval_") and "top" in str(c)]
    accuracy_cols = [c for c in accuracy_cols if pd.to_numeric(table[c], errors="coerce").notna().any()]
    n_panels = 1 + bool(lr_col) + bool(accuracy_cols)
    fig = Figure(figsize=(4.5 * n_panels + 2, 4), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    steps = pd.to_numeric(table[step_col], errors="coerce")
    _plot_series(axes[0], table, steps, loss_cols, step_col, "loss", "losses")
    if lr_col:
        values = pd.to_numeric(table[lr_col], errors="coerce")
        ok = values.notna() & steps.notna()
        axes[1].plot(steps[ok], values[ok], color="black")
        axes[1].set_xlabel(step_col)
        axes[1].set_ylabel(lr_col)
        axes[1].set_title("learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if accuracy_cols:
        _plot_series(axes[-1], table, steps, accuracy_cols, step_col, "accuracy", "held-out masked-gene accuracy")
        axes[-1].set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    return _finish(fig, save)
