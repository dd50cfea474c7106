"""UMAP figures of cell embeddings: the 2-D layout (umap-learn) and one scatter panel per annotation."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import ConfigError, InputDataError
from .common import _class_names, _finish, category_colours, plain_text

if TYPE_CHECKING:
    import anndata
    from numpy.typing import ArrayLike

_MAX_LEGEND = 30  # beyond this many categories a legend is unreadable; colour without it


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
