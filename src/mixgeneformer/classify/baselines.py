"""Baselines on the same cells as the model: logistic regression on log-normalized counts, kNN on PCA
(across species on shared 1:1 orthologs), and logistic regression on the tokens the model reads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA

from .. import genes
from ..errors import ConfigError, InputDataError, name_list
from ..readers import ReadOptions
from .config import BaselineConfig, BaselineMethod
from .metrics import EvalResult, Prediction, evaluate
from .tasks import Task, TokenizedCells
from .zeroshot import _dense, knn_predict, logreg_predict

if TYPE_CHECKING:
    import anndata

logger = logging.getLogger(__name__)


def read_counts(adata: anndata.AnnData, read: ReadOptions | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Every cell's counts and gene IDs, read and checked the way the tokenizer reads them.

    ``read`` (default :class:`ReadOptions`: ``X``, var index) picks the matrix (``layer``; ``"raw"``
    reads ``adata.raw``) and the gene-ID column; values that are not raw counts (log-normalised,
    scaled, NaN) are refused with the readers' message naming the fix, never re-normalised.
    """
    read = read or ReadOptions()
    with read.open(adata) as source:
        blocks = [chunk.counts for chunk in source.iter_chunks(read.chunk_size)]
        gene_ids = np.asarray(source.gene_ids, dtype=object)
    counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, gene_ids.size), dtype=np.float32)
    return counts, gene_ids


def log_normalize(counts: sp.spmatrix | np.ndarray, target_sum: float = 1e4) -> sp.csr_matrix:
    """Scale each cell to ``target_sum`` total counts, then ``log1p`` (CellTypist / scanpy style)."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    normalized = sp.diags(scale.astype(np.float32)) @ counts
    normalized.data = np.log1p(normalized.data)
    return sp.csr_matrix(normalized)


def ortholog_counts(adata: anndata.AnnData, species: Literal["human", "mouse"], read: ReadOptions | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts on human Ensembl IDs through one-to-one orthologs.

    Counts and gene identifiers come from :func:`read_counts` (``read``: layer, gene-ID column).
    The identifiers (symbols or Ensembl IDs, via :func:`genes.map_gene_ids`) are resolved for
    ``species``; mouse genes are mapped to their 1:1 human ortholog. Genes without one are dropped;
    genes mapping to the same human ID are summed. Returns ``(counts, human_ids)``.
    """
    counts, gene_ids = read_counts(adata, read)
    mapping = genes.map_gene_ids(gene_ids, species=species)
    ids = np.asarray(mapping.ensembl_ids, dtype=object)
    if species == "mouse":
        table = genes.one_to_one_orthologs()
        to_human = pd.Series(table["human_id"].to_numpy(), index=table["mouse_id"].to_numpy())
        to_human = to_human[~to_human.index.duplicated()]
        ids = to_human.reindex(ids).fillna("").to_numpy(dtype=object)
    else:
        human_ok = pd.Index(genes.one_to_one_orthologs()["human_id"])  # hashed lookup (np.isin sorts objects: seconds)
        ids = np.where(pd.Index(ids).isin(human_ok), ids, "").astype(object)
    return _sum_columns_by_id(counts, ids)


def _sum_columns_by_id(counts: sp.csr_matrix, ids: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Merge columns sharing an ID (summing), dropping columns whose ID is empty."""
    ids = np.asarray(ids, dtype=object).astype(str)
    keep = np.flatnonzero(ids != "")
    uniques, inverse = np.unique(ids[keep], return_inverse=True)
    merge = sp.csr_matrix(
        (np.ones(keep.size, dtype=np.float32), (keep, inverse.reshape(-1))), shape=(ids.size, uniques.size)
    )
    return sp.csr_matrix(counts.astype(np.float32) @ merge), uniques.astype(object)


def align_genes(
    a: sp.csr_matrix, a_ids: np.ndarray, b: sp.csr_matrix, b_ids: np.ndarray
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """Restrict two matrices to their shared gene IDs, in one common column order."""
    shared, a_pos, b_pos = np.intersect1d(np.asarray(a_ids, dtype=str), np.asarray(b_ids, dtype=str), return_indices=True)
    if shared.size == 0:
        raise InputDataError("the two datasets share no genes after ortholog mapping; check species and gene IDs.")
    return sp.csr_matrix(a[:, a_pos]), sp.csr_matrix(b[:, b_pos]), shared.astype(object)


def baseline_predict(
    train_counts: sp.spmatrix,
    train_y: np.ndarray,
    test_counts: sp.spmatrix,
    method: BaselineMethod,
    config: BaselineConfig | None = None,
    seed: int = 0,
) -> Prediction:
    """A count-based baseline on the same cells.

    ``logreg_counts``: normalise to 10,000, log1p, standardise (clip 10), L2 logistic regression
    (CellTypist-style). ``knn_pca``: the same normalisation, standardisation and clip, PCA (50
    components, fit on training cells; sklearn's seeded randomized solver, which need not equal an
    exact PCA in its last components), kNN (k=5, cosine). Genes never expressed in training are left out.
    """

    config = config or BaselineConfig()
    train_log = log_normalize(train_counts, config.target_sum)
    test_log = log_normalize(test_counts, config.target_sum)
    expressed = np.flatnonzero(np.asarray(train_log.getnnz(axis=0)) > 0)
    train_log, test_log = train_log[:, expressed], test_log[:, expressed]
    if method == "logreg_counts":
        return logreg_predict(
            train_log, train_y, test_log, c=config.logreg_c, max_iter=config.max_iter, clip=config.clip, seed=seed
        )
    if method == "knn_pca":
        train_dense, test_dense = _dense(train_log), _dense(test_log)
        mean = train_dense.mean(axis=0)
        std = train_dense.std(axis=0)
        std[std == 0] = 1.0
        n_comps = min(config.n_pcs, train_dense.shape[0] - 1, train_dense.shape[1])
        pca = PCA(n_components=n_comps, random_state=seed, svd_solver="randomized")
        bound = np.inf if config.clip is None else config.clip
        train_pcs = pca.fit_transform(np.clip((train_dense - mean) / std, -bound, bound))
        test_pcs = pca.transform(np.clip((test_dense - mean) / std, -bound, bound))
        return knn_predict(train_pcs, train_y, test_pcs, k=config.knn_k)
    raise ConfigError(f"baseline {method!r} is not one of ['logreg_counts', 'knn_pca'] (logreg_tokens: token_baseline).")


def baselines(
    task: Task,
    methods: Sequence[BaselineMethod] = ("logreg_counts", "knn_pca"),
    config: BaselineConfig | None = None,
    species: tuple[str, str] | None = None,
    read: ReadOptions | None = None,
) -> list[EvalResult]:
    """Run count-based baselines on a task's cells.

    The counts are read as the tokenizer reads them (:func:`read_counts` with ``read``: the layer,
    e.g. ``"counts"`` or ``"raw"``, and the gene-ID column; a matrix without raw counts is an
    error). Within one dataset the genes are used as given. When ``species=(train_species,
    test_species)`` names two different species, both sides are mapped to human Ensembl IDs through
    one-to-one orthologs (:func:`ortholog_counts`) and restricted to the shared genes; each cell is
    then scaled over those shared genes, so cells of both species are proportions over the same
    genes (a species' share of counts on genes without an ortholog does not shift its cells).
    ``methods``: ``"logreg_counts"`` and / or ``"knn_pca"`` (one name may be given as a string).
    """
    methods = name_list(methods, "methods")
    unknown = [m for m in methods if m not in ("logreg_counts", "knn_pca")]
    if unknown:  # before any count is read or any method has run
        raise ConfigError(f"baseline methods {unknown} are not among ['logreg_counts', 'knn_pca'] (logreg_tokens: token_baseline).")
    if species is not None and species[0] != species[1]:
        train_all, train_ids = ortholog_counts(task.train_data, species[0], read)  # type: ignore[arg-type]
        test_all, test_ids = ortholog_counts(task.test_data, species[1], read)  # type: ignore[arg-type]
        train_all, test_all, shared = align_genes(train_all, train_ids, test_all, test_ids)
        logger.info("baselines: %d one-to-one ortholog genes shared", shared.size)
    elif task.train_data is not task.test_data:
        train_all, test_all, _ = align_genes(*read_counts(task.train_data, read), *read_counts(task.test_data, read))
    else:
        train_all = test_all = read_counts(task.train_data, read)[0]
    train_counts, test_counts = train_all[task.train_rows], test_all[task.test_rows]
    return [
        evaluate(task, baseline_predict(train_counts, task.train_labels, test_counts, method, config), method)
        for method in methods
    ]


def ortholog_columns(ortholog_map: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Per token id its column in a bag of genes matched by ortholog: the smaller token id of its 1:1
    ortholog pair (``Vocabulary.ortholog_map``), its own id where it has none (a shared token of an
    ortholog vocabulary maps to itself). Within one species no two genes share a column."""
    ortholog_map = np.asarray(ortholog_map, dtype=np.int64)
    ids = np.arange(ortholog_map.size, dtype=np.int64)
    paired = (ortholog_map >= 0) & ~np.isin(ids, special)
    return np.where(paired, np.minimum(ids, ortholog_map), ids)


def token_bag(
    cells: TokenizedCells, obs_rows: np.ndarray, n_tokens: int, special: np.ndarray, columns: np.ndarray | None = None
) -> sp.csr_matrix:
    """``(len(obs_rows), n_tokens)`` binary: 1 where a gene is among the cell's tokens (special tokens left
    out); ``columns`` (token id -> column, e.g. :func:`ortholog_columns`) puts tokens together."""
    ids = cells.select(obs_rows)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if len(ids) else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(ids)), lengths)
    keep = ~np.isin(cols, special)
    if columns is not None:
        cols = np.asarray(columns, dtype=np.int64)[cols]
    values = np.ones(int(keep.sum()), dtype=np.float32)
    bag = sp.csr_matrix((values, (rows[keep], cols[keep])), shape=(len(ids), n_tokens))
    bag.data[:] = 1.0  # a human gene and its mouse ortholog in one cell (a mixed file) are one gene
    return bag


def token_baseline(
    task: Task, tokens: tuple[TokenizedCells, TokenizedCells], n_tokens: int, special: np.ndarray,
    config: BaselineConfig | None = None, ortholog_map: np.ndarray | None = None,
) -> EvalResult:
    """``logreg_tokens``: the count baseline's logistic regression on *which genes the model reads*.

    Each cell becomes a binary bag of its rank-value tokens (its top ``max_len`` genes; order and
    expression dropped), standardised and capped like ``logreg_counts``; tokens absent from every
    training cell are left out. It measures what a linear model extracts from the model's input:
    where it scores below ``logreg_counts``, the genes beyond ``max_len`` carry the difference, which
    no training of the model can recover at that input length. With ``ortholog_map``
    (``Vocabulary.ortholog_map``; :func:`run_classification` passes it) a gene and its 1:1 ortholog
    are one feature (:func:`ortholog_columns`), as the count baselines match genes across species: a
    separate vocabulary's human and mouse tokens share no column otherwise, and every cell of the
    other species would be an empty bag (one class predicted for all). An ortholog vocabulary's shared
    tokens are one feature either way; within one species the map changes nothing.
    """
    config = config or BaselineConfig()
    columns = None if ortholog_map is None else ortholog_columns(ortholog_map, special)
    train = token_bag(tokens[0], task.train_rows, n_tokens, special, columns)
    test = token_bag(tokens[1], task.test_rows, n_tokens, special, columns)
    seen = np.flatnonzero(np.asarray(train.getnnz(axis=0)) > 0)
    prediction = logreg_predict(
        train[:, seen], task.train_labels, test[:, seen], c=config.logreg_c, max_iter=config.max_iter, clip=config.clip
    )
    return evaluate(task, prediction, "logreg_tokens")
