"""How well an embedding mixes species within cell types (integration scores).

With the optional ``scib-metrics`` package (``pip install "mixgeneformer[metrics]"``) the scores
are scib's own:

* ``ilisi``: integration LISI of the species label on one 90-neighbour graph of all cells,
  rescaled as ``(median LISI − 1) / (number of species − 1)``
  (``scib_metrics.ilisi_knn(..., scale=True)``; 0 = each neighbourhood one species, 1 = every
  neighbourhood holds the species in equal parts, which unequal species sizes cannot reach; NaN
  with fewer than 6 cells, where LISI's perplexity, a third of the graph, would be 1 and scib-metrics
  returns its sentinel −1 for every cell: an iLISI of −2);
* ``species_asw``: batch silhouette of species computed within each cell type, scib's definition
  (``scib_metrics.silhouette_batch``: ``1 − |silhouette_samples(X_type, species)|`` averaged per
  type, then over types; 1 = species overlap inside a type, 0 = separate; NaN when no cell type
  holds two species). It is computed with scikit-learn's ``silhouette_samples``, with or without
  scib-metrics: the two agree to 1e-6 (tests/test_audit_embed.py), and scib-metrics' jax version
  compiles once per cell-type size (9 of the 13 s the demo spent on mixing scores, against 0.1 s);
* ``kbet`` (only with ``kbet=True``: minutes of CPU even for a few thousand cells): kBET
  acceptance rate of species within each cell type (``scib_metrics.kbet_per_label``).

The neighbour graphs are those of scib-metrics' ``Benchmarker``: each cell's 90 nearest
neighbours (Euclidean, exact), the cell itself first, for LISI; their first 50 for kBET.
Cells without a finite embedding or without a cell type (NaN, or a text such as ``"nan"`` /
``""`` that stands for one, as in classification) are left out; fewer than two species is an error.

Neither score has a fixed "perfect" value: both depend on the species proportions and the cell
types. So each comes with a reference (``reference=True``): the same score with the species
labels shuffled within each cell type (``*_shuffled``), what complete mixing inside every type
gives on these cells.

Without scib-metrics only ``species_asw`` is given, and ``backend`` says so (``"sklearn"``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import silhouette_samples
from sklearn.neighbors import NearestNeighbors

from . import classify as C
from .classify.labels import MISSING_TEXT
from .errors import ArtifactError, ConfigError, InputDataError
from .fileio import atomic_file, written_together

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)
N_NEIGHBORS = 90  # scib's graph size for LISI (neighbours, the cell itself included)
KBET_NEIGHBORS = 50  # scib's graph size for kBET
#: the smallest LISI graph (the cell itself included) whose perplexity, a third of it, is above 1: at
#: perplexity 1 scib-metrics' Simpson index is its "no neighbours" sentinel -1 for every cell
MIN_LISI_NEIGHBORS = 6


def scib_available() -> bool:
    try:
        import scib_metrics  # noqa: F401
    except Exception:  # ImportError, or jax failing to initialise
        return False
    return True


def missing_labels(values: ArrayLike) -> np.ndarray:
    """Boolean mask of values that stand for no label: None / NaN, or a text in
    :data:`mixgeneformer.classify.labels.MISSING_TEXT` (``"nan"``, ``""``, ``"None"`` ...)."""
    series = pd.Series(np.asarray(values, dtype=object))
    return (series.isna() | series.astype(str).str.strip().str.lower().isin(MISSING_TEXT)).to_numpy()


def _check(embeddings: Any, species: Any, cell_types: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(embeddings, dtype=np.float32)
    species, cell_types = np.asarray(species, dtype=object), np.asarray(cell_types, dtype=object)
    if x.ndim != 2 or not (x.shape[0] == species.size == cell_types.size):
        raise InputDataError(
            f"embeddings {x.shape}, species ({species.size}) and cell types ({cell_types.size}) must describe the same cells."
        )
    no_species = missing_labels(species)
    if no_species.any():
        raise InputDataError(f"{int(no_species.sum())} cells have no species label; give every cell its species.")
    batch, labels = species.astype(str), cell_types.astype(str)
    keep = np.isfinite(x).all(axis=1)
    if keep.sum() < 2:
        raise InputDataError(
            f"only {int(keep.sum())} of {keep.size} cells have a finite embedding; species mixing needs at least 2. "
            "Check the model (a diverged training gives NaN embeddings) and the cells' genes."
        )
    unlabelled = missing_labels(cell_types) & keep
    if unlabelled.any():
        logger.warning("%d cells without a cell type are left out of the species-mixing scores", int(unlabelled.sum()))
    keep &= ~unlabelled
    if np.unique(batch[keep]).size < 2:
        raise InputDataError(
            f"species mixing needs cells of at least two species; the cells scored are all {sorted(set(batch[keep]))}."
        )
    return x[keep], batch[keep], labels[keep]


def _mixable_types(batch: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Row masks of the cell types that hold at least two species and more cells than species: the
    types scib's batch ASW scores (one species only, or one cell per species, is skipped)."""
    masks = (labels == t for t in np.unique(labels))
    return [rows for rows in masks if 1 < np.unique(batch[rows]).size < rows.sum()]


def species_asw_sklearn(x: np.ndarray, batch: np.ndarray, labels: np.ndarray) -> float:
    """scib's batch ASW with scikit-learn: per cell type, mean of ``1 − |silhouette by species|``."""
    scores = [float(np.mean(1.0 - np.abs(silhouette_samples(x[rows], batch[rows], metric="euclidean"))))
              for rows in _mixable_types(batch, labels)]
    return float(np.mean(scores)) if scores else float("nan")


def shuffled_within_types(species: np.ndarray, cell_types: np.ndarray, seed: int = 0) -> np.ndarray:
    """``species`` permuted among the cells of each type: the labels of complete mixing inside types."""
    rng = np.random.default_rng(seed)
    out = species.copy()
    for label in np.unique(cell_types):
        rows = np.flatnonzero(cell_types == label)
        out[rows] = species[rng.permutation(rows)]
    return out


def species_mixing(
    embeddings: ArrayLike, species: ArrayLike, cell_types: ArrayLike, n_neighbors: int = N_NEIGHBORS,
    kbet: bool = False, reference: bool = True,
) -> dict[str, Any]:
    """Species-mixing scores of an embedding (module docstring); NaN rows are skipped.

    Returns
    -------
    dict
        ``species_asw`` (always), ``ilisi`` (and ``kbet`` when asked) with scib-metrics, ``backend``
        (``"scib-metrics"`` or ``"sklearn"``); with ``reference``, ``species_asw_shuffled`` and
        ``ilisi_shuffled``: the scores of the same cells with species shuffled within each type.
    """
    if n_neighbors < MIN_LISI_NEIGHBORS:
        raise ConfigError(f"n_neighbors={n_neighbors}: LISI needs at least {MIN_LISI_NEIGHBORS} (its perplexity is a third of it)")
    x, batch, labels = _check(embeddings, species, cell_types)
    mixed = shuffled_within_types(batch, labels) if reference else None
    asw = {"species_asw": species_asw_sklearn(x, batch, labels)}
    if mixed is not None:
        asw["species_asw_shuffled"] = species_asw_sklearn(x, mixed, labels)
    if not scib_available():
        return {**asw, "backend": "sklearn"}
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults

    # scib's Benchmarker graph: every cell's nearest neighbours with the cell itself first
    distances, indices = NearestNeighbors(n_neighbors=int(min(n_neighbors, x.shape[0]))).fit(x).kneighbors(x)
    neighbors = NeighborsResults(indices=indices, distances=distances)

    too_few = neighbors.n_neighbors < MIN_LISI_NEIGHBORS  # perplexity 1: scib's sentinel LISI -1 gives iLISI -2
    if too_few:
        logger.warning("iLISI needs at least %d cells, got %d: it is NaN", MIN_LISI_NEIGHBORS, x.shape[0])

    def ilisi(species: np.ndarray) -> float:
        return float("nan") if too_few else float(scib_metrics.ilisi_knn(neighbors, species, scale=True))

    out: dict[str, Any] = {"species_asw": asw["species_asw"], "ilisi": ilisi(batch), "backend": "scib-metrics"}
    if mixed is not None:
        out["species_asw_shuffled"] = asw["species_asw_shuffled"]
        out["ilisi_shuffled"] = ilisi(mixed)
    if kbet:
        try:
            graph = neighbors.subset_neighbors(min(KBET_NEIGHBORS, neighbors.n_neighbors))
            out["kbet"] = float(scib_metrics.kbet_per_label(graph, batch, labels))
        except Exception as exc:  # kBET needs enough cells per type; report the others regardless
            logger.warning("kBET could not be computed (%s: %s)", type(exc).__name__, exc)
            out["kbet"] = float("nan")
    return out


def cross_species_scores(
    data: dict[str, Any],
    embeddings: dict[str, np.ndarray],
    rows: dict[str, np.ndarray],
    label_key: str,
    baseline: bool = True,
    per_type: bool = False,
) -> dict[str, Any]:
    """Cross-species label transfer and species mixing of a human + mouse embedding.

    Parameters
    ----------
    data
        ``{"human": AnnData, "mouse": AnnData}`` with raw counts and ``obs[label_key]``.
    embeddings, rows
        Per species, the cells' embeddings and the obs positions they belong to (one row each;
        rows with a non-finite embedding, e.g. cells the tokenizer dropped, are left out).
    label_key
        Cell-type column; types are matched across species by canonical name
        (:func:`mixgeneformer.classify.transfer_task`).
    baseline
        Also score kNN on 50 PCs of one-to-one-ortholog counts.
    per_type
        Also the F1 of each shared type: ``type_f1_<src>-><tgt>:<type>`` (and ``pca_type_f1_...``
        with ``baseline``).

    Returns
    -------
    dict
        ``transfer_f1_<src>-><tgt>`` / ``transfer_acc_<src>-><tgt>`` (kNN, k=5, cosine, all source
        cells -> all target cells of shared types), ``pca_f1_<src>-><tgt>`` with ``baseline``, and
        :func:`species_mixing` of the cells whose type both species share.
    """
    config = C.LabelConfig(key=label_key)
    embeddings, rows = _embedded_cells(embeddings, rows)
    position = {s: pd.Index(np.asarray(r)) for s, r in rows.items()}
    out: dict[str, Any] = {}
    shared_types: set[str] = set()
    for src, tgt in (("mouse", "human"), ("human", "mouse")):
        task = C.transfer_task(data[src], data[tgt], config, f"{src}->{tgt}",
                               source_rows=np.asarray(rows[src]), target_rows=np.asarray(rows[tgt]))
        train_x = embeddings[src][position[src].get_indexer(task.train_rows)]
        test_x = embeddings[tgt][position[tgt].get_indexer(task.test_rows)]
        scored = {"transfer": C.evaluate(task, C.zero_shot_predict(task, train_x, test_x, "knn"), "knn")}
        out[f"transfer_f1_{src}->{tgt}"] = scored["transfer"].metrics["macro_f1"]
        out[f"transfer_acc_{src}->{tgt}"] = scored["transfer"].metrics["accuracy"]
        if baseline:
            scored["pca"] = C.baselines(task, ("knn_pca",), species=(src, tgt))[0]
            out[f"pca_f1_{src}->{tgt}"] = scored["pca"].metrics["macro_f1"]
        tested = sorted(set(task.test_labels.tolist()))
        if per_type:
            for name, result in scored.items():
                prefix = "type_f1" if name == "transfer" else "pca_type_f1"
                out.update({f"{prefix}_{src}->{tgt}:{t}": float(result.report["f1"].get(t, 0.0)) for t in tested})
        shared_types |= set(tested)
    labels = {s: data[s].obs[label_key].astype(str).to_numpy()[np.asarray(rows[s])] for s in ("human", "mouse")}
    out.update(shared_type_mixing(embeddings, labels, shared_types)[0])
    return out


def _embedded_cells(
    embeddings: dict[str, np.ndarray], rows: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per species, the embeddings and obs positions of the cells with a finite embedding (the NaN
    rows of cells the tokenizer dropped are left out, with a warning)."""
    kept_x, kept_rows = {}, {}
    for s in ("human", "mouse"):
        x, r = np.asarray(embeddings[s]), np.asarray(rows[s])
        if x.ndim != 2 or x.shape[0] != r.size:
            raise InputDataError(f"{s}: {x.shape[0] if x.ndim else 0} embedding rows but {r.size} obs rows; "
                                 "give one embedding row per obs position in rows.")
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            logger.warning("%s: %d cells without a finite embedding are left out", s, int((~finite).sum()))
        kept_x[s], kept_rows[s] = x[finite], r[finite]
    return kept_x, kept_rows


def shared_type_mixing(
    embeddings: dict[str, np.ndarray], cell_types: dict[str, ArrayLike], shared: Iterable[str] | None = None
) -> tuple[dict[str, Any], int, list[str]]:
    """:func:`species_mixing` of the cells whose type (canonical name) is in ``shared`` (default: every
    type both species have), human cells first; rows with a non-finite embedding are left out.

    Returns (the scores, the number of cells scored, the shared types).
    """
    labelled = {s: ~missing_labels(t) for s, t in cell_types.items()}
    canonical = {s: C.canonical_labels(np.asarray(t)) for s, t in cell_types.items()}
    if shared is None:
        shared = set(canonical["human"][labelled["human"]]) & set(canonical["mouse"][labelled["mouse"]])
    shared = sorted(str(t) for t in shared)
    if not shared:  # species_mixing would blame the embeddings ("only 0 of 0 cells have a finite embedding")
        types = {s: sorted(set(canonical[s][labelled[s]])) for s in ("human", "mouse")}
        raise InputDataError(f"no cell type is shared by human and mouse (human: {types['human']}, mouse: {types['mouse']}); "
                             "species mixing is scored within the types both species have. Check the label column.")
    parts, species, types = [], [], []
    for s in ("human", "mouse"):
        keep = np.isin(canonical[s], shared) & labelled[s] & np.isfinite(embeddings[s]).all(axis=1)
        parts.append(embeddings[s][keep])
        species += [s] * int(keep.sum())
        types.append(canonical[s][keep])
    scores = species_mixing(np.concatenate(parts), np.asarray(species), np.concatenate(types))
    return scores, len(species), shared


def seed_table(per_seed: pd.DataFrame, by: str = "config") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-seed benchmark rows -> (``metric x <by>`` table of "mean ± sd" strings, the means).

    Numeric columns only (``seed`` and ``by`` excluded); groups keep their first-seen order; the
    statistics are :func:`mixgeneformer.classify.seed_summary`'s (sample sd).
    """
    numeric = [c for c in per_seed.columns if c not in ("seed", by) and pd.api.types.is_numeric_dtype(per_seed[c])]
    summary = C.seed_summary(per_seed, by=(by,), metrics=numeric).set_index(by)
    mean = summary[numeric]
    table = mean.T.astype(object)
    for group in mean.index:
        table[group] = [C.mean_sd_text(summary.at[group, c], summary.at[group, f"{c}_sd"]) for c in numeric]
    table.index.name = "metric"
    return table, mean


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """A benchmark script's ``--overwrite``: without it an existing ``--out`` (and the files written beside it) is refused."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out and the files beside it (refused without: an earlier run's results record)")


def check_benchmark_out(paths: Iterable[str | os.PathLike | None], overwrite: bool) -> None:
    """Before a benchmark runs (and again before it writes): ArtifactError for the first of ``paths``
    (its ``--out`` and the files written beside it; None / "" skipped) that exists, unless ``overwrite``."""
    existing = next((Path(p) for p in paths if p and (Path(p).exists() or Path(p).is_symlink())), None)
    if existing is not None and not overwrite:
        raise ArtifactError(
            f"{existing} already exists: the results record of an earlier benchmark run, which this run would replace. "
            "Pass --overwrite to replace it, or choose another --out."
        )


def write_benchmark_files(files: Mapping[str | os.PathLike, str], overwrite: bool) -> None:
    """Write each text of ``files`` (path -> text) atomically, all or none; an existing path is
    refused unless ``overwrite`` (:func:`check_benchmark_out`: one may have appeared while the benchmark ran)."""
    check_benchmark_out(files, overwrite)
    with written_together():
        for path, text in files.items():
            with atomic_file(path) as handle:  # an interrupted write leaves the previous file, not half of it
                handle.write(text)


def write_benchmark_text(header: str, table: pd.DataFrame, per_seed: pd.DataFrame, out: str | os.PathLike | None,
                         overwrite: bool = False) -> str:
    """Header, the summary table and the per-seed rows as markdown; printed, and written to ``out``
    if given (:func:`write_benchmark_files`: an existing ``out`` only with ``overwrite``)."""
    text = "\n".join([header, "", C.markdown_table(table.reset_index()), "", "Per seed:", "", C.markdown_table(per_seed)])
    print(text)
    if out:
        write_benchmark_files({out: text + "\n"}, overwrite)
    return text


__all__ = [
    "KBET_NEIGHBORS",
    "MIN_LISI_NEIGHBORS",
    "N_NEIGHBORS",
    "add_overwrite_argument",
    "check_benchmark_out",
    "cross_species_scores",
    "missing_labels",
    "scib_available",
    "seed_table",
    "shared_type_mixing",
    "shuffled_within_types",
    "species_asw_sklearn",
    "species_mixing",
    "write_benchmark_files",
    "write_benchmark_text",
]
