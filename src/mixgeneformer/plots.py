"""Figures: UMAP of embeddings, confusion matrices, perturbation rankings, training curves.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, so it is
safe on headless machines and in loops), returns it, and writes it atomically when ``save`` is
given (format from the file suffix; PNG at 150 dpi by default).
"""

from __future__ import annotations

import io
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
_NAME_COLUMNS = ("symbol", "gene_symbol", "gene", "gene_id", "ensembl_id", "perturbed")  # perturbation bar labels


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` atomically; the format follows the suffix (png, pdf, svg...)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ConfigError(f"cannot save a figure as {path.name!r}: unknown format {fmt!r}; use one of "
                          f"{sorted(fig.canvas.get_supported_filetypes())}")
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format=fmt, dpi=dpi, bbox_inches="tight", metadata=figure_metadata(fmt))
    return path


def _finish(fig: Figure, save: str | os.PathLike | None) -> Figure:
    if save is not None:
        save_figure(fig, save)
    return fig


# UMAP --------------------------------------------------------------------------------------
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
    reducer = umap_learn.UMAP(n_neighbors=k, min_dist=min_dist, metric=metric, random_state=random_state,
                              n_jobs=1 if random_state is not None else -1, precomputed_knn=knn)
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
    """One panel. Categories in sorted order take :func:`category_colours`; cells
    without a label are grey, listed last. A number with more values than a legend holds: a colour bar."""
    missing = pd.isna(labels)
    if labels.dtype.kind in "fiu" and len(np.unique(labels[~missing])) > _MAX_LEGEND:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # NaN drawn grey, not left out
        points = ax.scatter(coords[:, 0], coords[:, 1], c=labels, s=point_size, cmap=cmap, linewidths=0, plotnonfinite=True)
        ax.figure.colorbar(points, ax=ax, label=name)
    else:
        names, numeric = _class_names(labels)
        categories = sorted(set(names.dropna()), key=float if numeric else None)  # by value when all are numbers
        groups = [(c, (names == c).fillna(False).to_numpy(bool), colour)
                  for c, colour in zip(categories, category_colours(len(categories)), strict=True)]
        groups += [("NA", missing, "lightgrey")] if missing.any() else []
        handles = [ax.scatter(coords[chosen, 0], coords[chosen, 1], s=point_size, linewidths=0, color=colour)
                   for _, chosen, colour in groups]
        if len(groups) <= _MAX_LEGEND:  # handles and texts given: a name starting with "_" is not left out
            texts = [plain_text(f"{c} ({int(chosen.sum())})") for c, chosen, _ in groups]
            ax.legend(handles, texts, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3, frameon=False)
    ax.set_title(name)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])


# long: a 21-line docstring; the body (29 lines) draws one panel per annotation.
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
        ``species`` or ``organism`` is used when present. Categories are sorted (numbers by
        value); cells without a label are grey, ``NA`` last in the legend.
    key
        ``obsm`` key of the embeddings (AnnData input only).
    n_neighbors, min_dist, metric, random_state
        Passed to ``umap.UMAP``.
    title, point_size, save
        Figure title; marker area (default scales with the number of cells); optional output
        path (png, pdf, svg...).
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


# Confusion matrix --------------------------------------------------------------------------
def _matrix_in_order(matrix: pd.DataFrame, labels: list[object]) -> np.ndarray:
    """The counts of a DataFrame confusion matrix with rows and columns both in ``labels``' order
    (by name: a table whose columns are in another order than its index, or a ``labels=`` order,
    was drawn as stored, its counts under the wrong classes)."""
    if set(matrix.columns) != set(matrix.index):
        raise InputDataError(f"matrix must have the same classes as rows (true) and columns (predicted); rows "
                             f"{list(matrix.index)}, columns {list(matrix.columns)}")
    if set(labels) != set(matrix.index) or len(labels) != len(set(labels)):
        raise InputDataError(f"labels {labels} must name each class of the matrix once; the matrix has {list(matrix.index)}")
    return matrix.reindex(index=labels, columns=labels).to_numpy(dtype=np.float64)


def _class_names(values: ArrayLike) -> tuple[pd.Series, bool]:
    """Labels as strings (missing: <NA>) and whether they are all numbers. Numbers are compared as
    numbers: 1 and 1.0 (an int column, a float column holding NaN) are one class "1"; text stays text."""
    series = pd.Series(np.asarray(values).astype(object))
    missing = series.isna().to_numpy()
    if missing.all() or pd.api.types.infer_dtype(series, skipna=True) not in ("integer", "floating", "mixed-integer-float"):
        return series.astype("string"), False
    number = pd.to_numeric(series).to_numpy(np.float64, na_value=np.nan)
    whole = np.isfinite(number) & (np.abs(number) < 2**53) & (number == np.round(number))
    text = np.where(whole, np.where(whole, number, 0).astype(np.int64).astype(str), number.astype(str))
    return pd.Series(text, dtype="string").mask(missing), True


def _counts_of_labels(y_true: ArrayLike, y_pred: ArrayLike, labels: Iterable[object] | None) -> tuple[np.ndarray, list[str]]:
    """The count matrix (rows true, columns predicted) of two label arrays and its class order."""
    (true, true_numeric), (pred, pred_numeric) = _class_names(y_true), _class_names(y_pred)
    if len(true) != len(pred):
        raise InputDataError(f"y_true has {len(true)} labels but y_pred has {len(pred)}")
    present = set(true.dropna()) | set(pred.dropna())
    if labels is None:
        labels = sorted(present, key=float if true_numeric and pred_numeric else None)  # "2" before "10"
    else:
        labels = list(_class_names(list(labels))[0])
        left_out = sorted(present - set(labels))
        if left_out or len(labels) != len(set(labels)):  # cells of a class left out vanished from its row total
            raise InputDataError(f"labels {labels} must name each class once, and every class of y_true / y_pred; "
                                 f"missing: {left_out}. List them all, or leave labels out")
    position = {label: i for i, label in enumerate(labels)}
    t, p = (names.map(position).to_numpy(dtype=np.float64, na_value=np.nan) for names in (true, pred))
    ok = ~(np.isnan(t) | np.isnan(p))
    counts = np.zeros((len(labels), len(labels)))
    np.add.at(counts, (t[ok].astype(np.int64), p[ok].astype(np.int64)), 1)
    return counts, labels


# long: a 20-line docstring; the body annotates every cell of the matrix.
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
        True and predicted labels (same length; a cell missing either is left out). Numbers are
        compared as numbers (1 and 1.0 are one class). Ignored when ``matrix`` is given.
    labels
        Class order; it must name every class of ``y_true`` and ``y_pred`` (it may add classes).
        Default: sorted union of both label sets (by value when all are numbers), or the matrix'
        index. With a DataFrame ``matrix``, its classes in the order to draw (matched by name).
    matrix
        A precomputed count matrix (rows true, columns predicted; finite, non-negative), e.g. a
        DataFrame indexed by class with the same classes as columns (in any order).
    normalize
        Show row fractions (each true class sums to 1); counts otherwise. Row totals are shown
        in the y tick labels either way. Up to 25 classes, every non-zero cell is annotated.
    title, save
        Figure title; optional output path.
    """
    if matrix is not None:
        if isinstance(matrix, pd.DataFrame):
            labels = list(matrix.index) if labels is None else list(labels)
            counts = _matrix_in_order(matrix, labels)
        else:
            counts = np.asarray(matrix, dtype=np.float64)
            labels = list(range(len(counts) if counts.ndim else 0)) if labels is None else list(labels)
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(labels):
            raise InputDataError(f"matrix must be square with one row per label; got {counts.shape} for {len(labels)} labels")
        if not (np.isfinite(counts) & (counts >= 0)).all():
            raise InputDataError("matrix must hold counts (finite, >= 0); it has NaN, infinite or negative cells")
    else:
        if y_true is None or y_pred is None:
            raise ConfigError("pass y_true and y_pred, or matrix=")
        counts, labels = _counts_of_labels(y_true, y_pred, labels)
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
        for i, j in zip(*np.nonzero(counts), strict=True):  # the non-zero cells, row i (true) at y = i
            text = f"{shown[i, j]:.2f}" if normalize else f"{counts[i, j]:.10g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if shown[i, j] > threshold else "black")
    ax.set_title(title or ("confusion matrix (row-normalized)" if normalize else "confusion matrix"))
    return _finish(fig, save)


# Perturbation ranking ----------------------------------------------------------------------
def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, required: bool = True) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(f"{what} column {wanted!r} not in the results; columns: {list(columns)}")
        return wanted
    found = next((name for name in candidates if name in columns), None)
    if found is None and required:
        raise ConfigError(f"no {what} column found (looked for {list(candidates)}); pass {what}= one of {list(columns)}")
    return found


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


# Training curves ---------------------------------------------------------------------------
def _series(table: pd.DataFrame, steps: pd.Series, col: Any) -> tuple[np.ndarray, np.ndarray]:
    """(step, value) of a column's logged values in step order; a step logged twice: its last value."""
    logged = pd.DataFrame({"x": steps, "y": pd.to_numeric(table[col], errors="coerce")}).dropna()
    logged = logged.drop_duplicates("x", keep="last").sort_values("x", kind="stable")
    return logged["x"].to_numpy(np.float64), logged["y"].to_numpy(np.float64)


def _plot_series(ax: Any, table: pd.DataFrame, steps: pd.Series, columns: list[Any], step_col: str, ylabel: str, title: str) -> None:
    """One panel: a line per column against the step (NaN cells skipped); baselines (``unigram``) dashed."""
    for col in columns:
        x, y = _series(table, steps, col)
        if len(x):
            style = "--" if "unigram" in str(col) else "-"
            ax.plot(x, y, style, label=col, marker="o" if len(x) < 30 else None, markersize=3)
    ax.set_xlabel(step_col)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)


def _read_metrics_csv(metrics: str | os.PathLike) -> pd.DataFrame:
    """A metrics CSV; a last line cut short by a crash while it was appended (no line end, fewer
    fields than the header) is left out: its cut number would be drawn as a logged value."""
    path = check_readable_file(metrics, "metrics CSV")
    try:
        text = path.read_text(encoding="utf-8")
        last = text[text.rfind("\n") + 1:]
        if last and last.count(",") < text.partition("\n")[0].count(","):
            text = text[: len(text) - len(last)]
        return pd.read_csv(io.StringIO(text))
    except (UnicodeDecodeError, pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise InputDataError(f"metrics CSV {path} cannot be parsed ({exc}); is it truncated?") from exc


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
        per series; each series is drawn in step order, a step logged twice with its last value
        (a resumed run's log not cut back to its checkpoint); a CSV's last line cut short by a crash
        is left out. Held-out accuracies (``eval_top1`` / ``eval_top10``, the baselines'
        ``eval_*unigram_top*``) or a fine-tuning log's ``eval_macro_f1`` / ``eval_accuracy`` get a
        panel of their own; baselines (``unigram`` in the name) are dashed.
    """
    table = metrics if isinstance(metrics, pd.DataFrame) else _read_metrics_csv(metrics)
    columns = list(table.columns)
    step_col = _pick(columns, None, ("step", "global_step", "steps"), "step")
    loss_cols = [c for c in columns if "loss" in str(c).lower()]
    if not loss_cols:
        raise InputDataError(f"no loss column in the metrics (looked for names containing 'loss'); columns: {columns}")
    steps = pd.to_numeric(table[step_col], errors="coerce")
    if not any(len(_series(table, steps, c)[0]) for c in loss_cols):
        raise InputDataError(f"the metrics ({len(table)} rows) hold no loss value at a step yet; nothing to plot")
    lr_col = next((c for c in ("lr", "learning_rate") if c in columns and len(_series(table, steps, c)[0])), None)

    accuracy_cols = [c for c in columns if str(c).startswith("eval_") and any(w in str(c) for w in ("top", "f1", "accuracy"))
                     and len(_series(table, steps, c)[0])]  # held-out top-k (pretraining), validation macro-F1 (fine-tuning)
    n_panels = 1 + bool(lr_col) + bool(accuracy_cols)
    fig = Figure(figsize=(4.5 * n_panels + 2, 4), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    _plot_series(axes[0], table, steps, loss_cols, step_col, "loss", "losses")
    if lr_col:
        _plot_series(axes[1], table, steps, [lr_col], step_col, lr_col, "learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if accuracy_cols:
        name = "held-out masked-gene accuracy" if all("top" in str(c) for c in accuracy_cols) else "validation scores"
        _plot_series(axes[-1], table, steps, accuracy_cols, step_col, "score", name)
        axes[-1].set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    return _finish(fig, save)
