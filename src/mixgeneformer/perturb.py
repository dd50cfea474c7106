"""In silico perturbation of rank-value-encoded cells, and its statistics.

A cell is a sequence of gene tokens ordered by normalized expression (SPEC §2). A perturbation
rewrites that sequence and asks how far the cell's embedding moves:

* ``delete``: remove the gene's token (the genes below it move up one rank);
* ``overexpress``: move the gene to the front (after any leading ``<cls>`` / species token);
* ``activate``: move the gene up to gene rank ``target_rank`` (a gene already ranked at or above
  it stays where it is); ``inhibit``: move it down to ``target_rank`` (negative ranks count from
  the end, ``-1`` = last).

Every perturbation of a cell is a *gather index* into the original sequence (deletion drops
indices, a move permutes them), so all variants of a cell are built at once as one 2-D array
(:func:`perturbation_indices`), and a variant's token ``j`` is the original token ``src[j]`` —
which also aligns gene states for per-gene shifts.

Scores (cell embedding = pooled hidden state of ``layer``, :mod:`mixgeneformer.embed`):

* ``shift`` = 1 − cos(original, perturbed);
* ``goal_shift`` = cos(perturbed, goal) − cos(original, goal), the goal state being the mean
  embedding of the cells labelled ``goal`` in ``state_column`` (likewise ``alt_shift:<state>``);
* with ``gene_shifts=True``, per affected gene 1 − cos of its contextual state before and after;
* with ``score="cell_emb"``, also Geneformer's ``InSilicoPerturber`` cell score: ``cell_emb`` =
  the mean, over the cell's remaining genes, of the cosine similarity between each gene's state
  (hidden state of ``layer``) before and after the perturbation — the perturbed gene's position
  left out of the original, special tokens left out of both — exactly the value Geneformer stores
  under ``(gene, "cell_emb")`` (1 = unchanged); ``cell_emb_shift`` = 1 − ``cell_emb`` is the
  column statistics rank by. ``shift`` compares the pooled cell embeddings; ``cell_emb`` averages
  per-gene changes, so genes that move a lot count however the pooling weighs them.

Variants of many cells run through the encoder together, in length-sorted batches, under
``torch.inference_mode``, computing only the layers needed. When every variant of a cell deletes
one gene, the first encoder block is computed for all of them at once
(:class:`mixgeneformer.deletion.DeletionScan`: shared projections, running attention sums).
Cells can be sharded across processes (``shard_index`` / ``num_shards``, default from the
``RANK`` / ``WORLD_SIZE`` environment that ``torchrun`` sets) and the shard tables concatenated.

Fast screening (``mode="screen"``, single-gene deletions)
--------------------------------------------------------
All deletions of a cell are estimated from one forward pass and one (batched) backward pass by a
first-order Taylor expansion, then the ``screen_top_k`` genes with the largest estimated score
are re-scored exactly (the table marks them ``exact=True``; ``*_estimate`` columns keep the
estimates). Two expansions (``screen_method``):

* ``"mask"`` (default), around the original cell: deleting the gene at position ``p`` is (a) its
  presence weight going from 1 to 0 — a weight that scales the token's attention as a key
  (additive log-weight, i.e. an attention-mask relaxation) and its weight in mean pooling — plus
  (b) every token after it moving one position up, an input change ``P[j-1] − P[j]`` of the
  position embeddings. For a read-out ``s`` of the cell embedding,
  ``Δs_p ≈ −∂s/∂w_p + Σ_{j>p} ∂s/∂x_j · (P[j-1] − P[j])``: a suffix sum over positions, so one
  backward pass gives the estimate for every ``p``.
* ``"shift"``, around the cell with its last gene deleted (computed exactly): deleting ``p``
  then replaces ``t_j`` by ``t_{j+1}`` at every position of ``[p, last)``, linearised in the word
  embeddings, ``Δs_p ≈ Σ_{j=p}^{last-1} ∂s/∂x_j · (W[t_{j+1}] − W[t_j])`` (gradient × input
  difference).

Read-outs: ``cos(e, goal)`` per state (the goal shift is linear to first order), the component of
``e`` along itself, and ``screen_probes`` random orthonormal directions orthogonal to it whose
squared projections estimate the orthogonal displacement ``‖δ⊥‖²`` and hence ``shift`` (which is
second order in ``δ``, so it needs the vector, not one gradient; a randomised, Hutchinson-style
estimate). All read-outs share the forward pass; their gradients come from one vmapped backward
pass (``is_grads_batched``). ``benchmarks/perturb.py`` reports the estimates' per-cell Spearman
correlation with exact scores on real cells and the speed-up.

Statistics over the cell table (rank-sum tests with FDR, vs-null, aggregate) live in
:mod:`mixgeneformer.perturb_stats`; :func:`perturbation_statistics` is re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from .deletion import DeletionScan, supports_shared_first_block
from .embed import (
    continue_encoder,
    embed_corpus,
    encoder_of,
    hidden_at_layer,
    inference_context,
    layers_to_run,
    pool_cells,
    resolve_device,
)
from .errors import ConfigError, GeneIdError, InputDataError
from .perturb_stats import StatsMode, benjamini_hochberg, gene_names, perturbation_statistics

if TYPE_CHECKING:
    import anndata
    import datasets

    from .vocab import Vocabulary

logger = logging.getLogger(__name__)

PerturbType = Literal["delete", "overexpress", "activate", "inhibit"]

__all__ = [
    "PerturbConfig",
    "PerturbationResult",
    "benjamini_hochberg",
    "cell_variants",
    "gene_names",
    "merge_shards",
    "perturb_anndata",
    "perturb_cells",
    "perturbation_indices",
    "perturbation_statistics",
    "resolve_genes",
    "screen_deletions",
    "write_results",
]

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PerturbConfig:
    """Options of an in silico perturbation run (saved as ``config.yaml`` beside the results).

    Attributes
    ----------
    perturb
        ``"delete"``, ``"overexpress"``, ``"activate"`` or ``"inhibit"``.
    genes
        Genes to perturb (Ensembl IDs or symbols); empty = every gene of each cell, one at a time.
    combine
        Perturb all ``genes`` together as one variant (a cell must express all of them).
    anchor
        A gene perturbed in every variant together with each other gene (combinations); the
        ``anchor_shift`` column is the shift relative to the anchor-only perturbation.
    target_rank
        Gene rank (0 = top) that ``activate`` / ``inhibit`` move genes to; negative counts from
        the end (-1 = last).
    state_column, start, goal, alternatives
        ``obs``/corpus column of cell states; cells of ``start`` are perturbed (all cells when
        unset); ``goal`` and ``alternatives`` are states whose mean embeddings shifts are
        measured towards.
    cells_per_state
        At most this many cells per state (drawn with ``seed``) for the state means and the
        perturbed cells.
    min_genes
        Cells with fewer genes are dropped (counted and logged).
    layer, pooling
        Hidden state and pooling of the cell embedding (see :mod:`mixgeneformer.embed`).
    mode
        ``"exact"``: every variant through the encoder; ``"screen"``: first-order estimates for
        all single-gene deletions, exact re-scoring of the top ``screen_top_k`` per cell.
    screen_top_k, screen_probes
        Genes re-scored exactly per cell; random probe directions of the shift estimate.
    screen_method
        First-order expansion used by screening: ``"mask"`` (presence-weight relaxation plus
        position shift, around the original cell) or ``"shift"`` (token shift around the cell
        with its last gene deleted). See the module docstring.
    gene_shifts
        Also measure how each remaining gene's contextual state moves (explicit ``genes`` only).
    score
        The score statistics test: ``"shift"`` (ours: 1 − cosine of the pooled cell embeddings
        before and after; ``goal_shift`` when a goal state is given) or ``"cell_emb"``
        (Geneformer's ``InSilicoPerturber`` cell score, for users migrating from Geneformer: adds
        the ``cell_emb`` column, the mean cosine similarity of the remaining genes' states before
        and after, and ``cell_emb_shift`` = 1 − ``cell_emb``, which is tested). Exact mode only.
    batch_size
        Sequences per forward pass (variants of several cells share a batch).
    device, precision
        Torch device (``None``: CUDA when available) and ``"fp32"`` / ``"bf16"`` / ``"auto"``.
    species
        Species used to resolve gene symbols: ``"auto"`` (the cells' species, else human).
    seed
        Seed of the per-state cell sampling and of the screening probes.
    shard_index, num_shards
        This process' share of the cells (``None``: from ``RANK`` / ``WORLD_SIZE``, else 0 / 1).
    """

    perturb: PerturbType = "delete"
    genes: list[str] = dataclasses.field(default_factory=list)
    combine: bool = False
    anchor: str | None = None
    target_rank: int | None = None
    state_column: str | None = None
    start: str | None = None
    goal: str | None = None
    alternatives: list[str] = dataclasses.field(default_factory=list)
    cells_per_state: int | None = None
    min_genes: int = 2
    layer: int = -2
    pooling: Literal["mean", "cls"] = "mean"
    mode: Literal["exact", "screen"] = "exact"
    screen_top_k: int = 20
    screen_probes: int = 8
    screen_method: Literal["mask", "shift"] = "mask"
    gene_shifts: bool = False
    score: Literal["shift", "cell_emb"] = "shift"
    batch_size: int = 16
    device: str | None = None
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    species: Literal["auto", "human", "mouse"] = "auto"
    seed: int = 0
    shard_index: int | None = None
    num_shards: int | None = None

    def __post_init__(self) -> None:
        if self.perturb not in ("delete", "overexpress", "activate", "inhibit"):
            raise ConfigError(
                f"perturb={self.perturb!r}; use 'delete', 'overexpress', 'activate' or 'inhibit'"
            )
        if self.perturb in ("activate", "inhibit") and self.target_rank is None:
            raise ConfigError(
                f"perturb={self.perturb!r} needs target_rank (CLI: --target-rank), the gene rank "
                "to move genes to (0 = top, -1 = last)"
            )
        if self.combine and len(self.genes) < 2:
            raise ConfigError("combine=True perturbs the listed genes together; list at least two genes")
        if self.combine and self.anchor is not None:
            raise ConfigError("use either combine (one set of genes) or anchor (pairs with one gene), not both")
        if (self.start or self.goal or self.alternatives) and not self.state_column:
            raise ConfigError("start / goal / alternatives need state_column (CLI: --state-column)")
        for name in ("min_genes", "batch_size", "screen_top_k", "screen_probes"):
            value = getattr(self, name)
            if value < (1 if name != "screen_top_k" else 0):
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.cells_per_state is not None and self.cells_per_state < 1:
            raise ConfigError(f"cells_per_state must be positive, got {self.cells_per_state}")
        if self.mode not in ("exact", "screen"):
            raise ConfigError(f"mode={self.mode!r}; use 'exact' or 'screen'")
        if self.mode == "screen" and (self.perturb != "delete" or self.combine or self.anchor or self.gene_shifts):
            raise ConfigError(
                "mode='screen' estimates single-gene deletions only; use perturb='delete' without "
                "combine/anchor/gene_shifts, or mode='exact'"
            )
        if self.score not in ("shift", "cell_emb"):
            raise ConfigError(f"score={self.score!r}; use 'shift' (ours) or 'cell_emb' (Geneformer's InSilicoPerturber)")
        if self.score == "cell_emb" and self.mode == "screen":
            raise ConfigError("score='cell_emb' needs every gene's state after each perturbation; use mode='exact'")
        if self.gene_shifts and not self.genes:
            raise ConfigError(
                "gene_shifts=True with every gene perturbed would produce cells × genes² rows; "
                "list the genes to perturb (CLI: --genes INS,GCG)"
            )
        if (self.shard_index is None) != (self.num_shards is None):
            raise ConfigError("give both shard_index and num_shards, or neither")
        if self.num_shards is not None and not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index={self.shard_index} must be in [0, num_shards={self.num_shards})")

    @property
    def statistics_score(self) -> str | None:
        """The cell-table column statistics test: ``cell_emb_shift`` for ``score="cell_emb"``, else
        None (``goal_shift`` when the table has it, else ``shift``)."""
        return "cell_emb_shift" if self.score == "cell_emb" else None

    @property
    def needs_gene_states(self) -> bool:
        """Whether every variant's per-gene states are compared with the original's."""
        return self.gene_shifts or self.score == "cell_emb"

    def shard(self) -> tuple[int, int]:
        """(shard index, number of shards), from the config or the torchrun environment."""
        from .sharding import shard_role

        role = shard_role(self.shard_index, self.num_shards)
        return role.index, role.world


# --------------------------------------------------------------------------------------------
# Genes
# --------------------------------------------------------------------------------------------
def resolve_genes(names: Sequence[str], vocab: Vocabulary, species: str = "auto") -> np.ndarray:
    """Token ids of genes given as Ensembl IDs (versions allowed) or symbols.

    Parameters
    ----------
    names
        Gene identifiers; symbols are resolved in ``species`` (``"auto"``: human first, then
        mouse, exact case before case-insensitive).
    vocab
        The model's vocabulary.

    Returns
    -------
    numpy.ndarray
        int64 token ids aligned with ``names``.

    Raises
    ------
    GeneIdError
        A name is unknown or its gene is not in the vocabulary.
    """
    from .genes import map_gene_ids, strip_versions

    out = np.empty(len(names), dtype=np.int64)
    order = ["human", "mouse"] if species in ("auto", "human") else ["mouse", "human"]
    if species != "auto":
        order = order[:1]
    for i, raw in enumerate(names):
        name = str(raw).strip()
        candidates: list[str] = []
        if _ENSEMBL.match(name):
            candidates = [str(strip_versions(np.array([name.upper()], dtype=object))[0])]
        else:
            for sp in order:
                try:
                    mapped = map_gene_ids([name], species=sp, min_coverage=0.0).ensembl_ids[0]
                except GeneIdError:
                    mapped = ""
                if mapped:
                    candidates.append(str(mapped))
            if not candidates:
                raise GeneIdError(
                    f"gene {name!r} is neither an Ensembl ID nor a known {'/'.join(order)} gene symbol; "
                    "check the spelling or pass its Ensembl ID (ENSG…/ENSMUSG…)"
                )
        tokens = [vocab.gene_to_id[c] for c in candidates if c in vocab.gene_to_id]
        if not tokens:
            raise GeneIdError(
                f"gene {name!r} ({', '.join(candidates)}) is not in the model's vocabulary "
                f"({len(vocab.gene_to_id):,} genes); it cannot be perturbed with this model"
            )
        out[i] = tokens[0]
    return out


# --------------------------------------------------------------------------------------------
# Perturbations as gather indices (pure functions on token arrays)
# --------------------------------------------------------------------------------------------
def perturbation_indices(
    tokens: np.ndarray,
    targets: np.ndarray,
    perturb: PerturbType,
    special_ids: np.ndarray,
    target_rank: int | None = None,
) -> np.ndarray:
    """Gather indices of perturbed copies of one cell.

    Parameters
    ----------
    tokens
        (length,) token ids of the cell (special tokens allowed at either end).
    targets
        (n_variants, k) positions in ``tokens`` of the genes each variant perturbs (gene
        positions, distinct within a row). For moves, the row order is the order the genes end
        up in.
    perturb
        ``"delete"``, ``"overexpress"``, ``"activate"`` or ``"inhibit"``.
    special_ids
        Non-gene token ids (``Vocabulary.special_ids``).
    target_rank
        Gene rank of ``activate`` / ``inhibit`` (negative: from the end).

    Returns
    -------
    numpy.ndarray
        (n_variants, length - k) int64 for deletions, (n_variants, length) for moves: variant
        token ``j`` is ``tokens[src[j]]``.

    Raises
    ------
    InputDataError
        A deletion would leave the cell with no gene.
    """
    tokens = np.asarray(tokens)
    targets = np.asarray(targets, dtype=np.int64)
    if targets.ndim != 2:
        raise ConfigError(f"targets must be a (n_variants, k) array of positions, got shape {targets.shape}")
    n_var, k = targets.shape
    length = len(tokens)
    is_gene = ~np.isin(tokens, special_ids)
    n_genes = int(is_gene.sum())
    if n_var and (targets.min() < 0 or targets.max() >= length or not is_gene[targets].all()):
        raise InputDataError("perturbation targets must be positions of gene tokens in the cell")
    rows = np.arange(n_var)[:, None]
    if perturb == "delete":
        if k >= n_genes:
            raise InputDataError(
                f"deleting {k} gene(s) from a cell with {n_genes} gene(s) would leave no gene; a cell "
                "needs at least one gene left (perturb fewer genes or drop such cells with min_genes)"
            )
        keep = np.ones((n_var, length), dtype=bool)
        keep[rows, targets] = False
        return np.broadcast_to(np.arange(length), (n_var, length))[keep].reshape(n_var, length - k)
    if perturb not in ("overexpress", "activate", "inhibit"):
        raise ConfigError(f"perturb={perturb!r}; use 'delete', 'overexpress', 'activate' or 'inhibit'")
    gene_rank = np.cumsum(is_gene) - 1  # rank of each gene position among genes (0 = top)
    first_gene = int(np.argmax(is_gene))
    if perturb == "overexpress":
        rank = 0
    else:
        if target_rank is None:
            raise ConfigError(f"perturb={perturb!r} needs target_rank")
        rank = int(target_rank) if target_rank >= 0 else n_genes - k + 1 + int(target_rank)
    rank = min(max(rank, 0), n_genes - k)
    current = gene_rank[targets]  # (n_var, k)
    # Activation never lowers a gene, inhibition never raises one: such genes stay in place.
    moves = current < rank if perturb == "inhibit" else current > rank
    moved = np.zeros((n_var, length), dtype=bool)
    moved[np.broadcast_to(rows, targets.shape)[moves], targets[moves]] = True
    n_moved = moves.sum(axis=1)
    block_rank = np.minimum(rank, n_genes - n_moved)  # (n_var,)
    # Where the block goes: just before the (first_gene + block_rank)-th unmoved position.
    others = ~moved
    others_before = np.cumsum(others, axis=1) - 1
    hit = others & (others_before == (first_gene + block_rank)[:, None])
    anchor_pos = np.where(hit.any(axis=1), hit.argmax(axis=1), length).astype(np.float64)
    order_in_block = np.cumsum(moves, axis=1) - 1  # position of each moved gene inside the block
    keys = np.broadcast_to(np.arange(length, dtype=np.float64), (n_var, length)).copy()
    fraction = (order_in_block + 1) / (n_moved[:, None] + 1.0)
    keys[np.broadcast_to(rows, targets.shape)[moves], targets[moves]] = (
        anchor_pos[:, None] - 1.0 + fraction
    )[moves]
    return np.argsort(keys, axis=1, kind="stable")


@dataclasses.dataclass
class _Variants:
    """All perturbed copies of one cell: gather indices plus what each row perturbs."""

    src: np.ndarray  # (n, width) int64
    gene_token: np.ndarray  # (n,) token perturbed (partner gene with an anchor; -1 for a set)
    gene_rank: np.ndarray  # (n,) its rank in the original cell (-1 for a set)
    label: list[str]  # (n,) human-readable name of the perturbed token(s)
    perturbed_tokens: np.ndarray  # (n, k) every token the row perturbs (for gene shifts)
    anchor_only: np.ndarray  # (n,) bool, the anchor-alone reference row


def cell_variants(
    tokens: np.ndarray,
    vocab: Vocabulary,
    config: PerturbConfig,
    gene_tokens: np.ndarray | None = None,
    anchor_token: int | None = None,
) -> _Variants | None:
    """Every variant ``config`` asks for of one cell, or None when the cell lacks the genes.

    ``gene_tokens`` (resolved ``config.genes``) None means every gene of the cell. A gene absent
    from the cell is skipped; with ``combine`` or an ``anchor`` the cell must hold all of the
    set / the anchor.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    special = vocab.special_ids
    gene_pos = np.flatnonzero(~np.isin(tokens, special))
    rank_of = np.full(len(tokens), -1, dtype=np.int64)
    rank_of[gene_pos] = np.arange(len(gene_pos))
    if gene_tokens is None:
        chosen = gene_pos
    else:
        # Position of each requested gene in this cell (a token occurs at most once per cell).
        sorter = np.argsort(tokens[gene_pos], kind="stable")
        where = np.searchsorted(tokens[gene_pos], gene_tokens, sorter=sorter)
        where = np.minimum(where, len(gene_pos) - 1)
        found = tokens[gene_pos][sorter[where]] == gene_tokens
        if config.combine:
            if not found.all():
                return None
            chosen = gene_pos[sorter[where]]
        else:
            chosen = gene_pos[sorter[where[found]]]
    anchor_pos = None
    if anchor_token is not None:
        hits = np.flatnonzero(tokens == anchor_token)
        if len(hits) == 0:
            return None
        anchor_pos = int(hits[0])
        chosen = chosen[chosen != anchor_pos]
    if config.combine:
        targets = chosen[None, :]
        names = "+".join(vocab.tokens[t] for t in tokens[chosen])
        src = perturbation_indices(tokens, targets, config.perturb, special, config.target_rank)
        return _Variants(
            src, np.array([-1]), np.array([-1]), [names], tokens[targets], np.zeros(1, dtype=bool)
        )
    if len(chosen) == 0 and anchor_pos is None:
        return None
    if anchor_pos is not None:
        pairs = np.stack([np.full(len(chosen), anchor_pos), chosen], axis=1)
        src_pairs = perturbation_indices(tokens, pairs, config.perturb, special, config.target_rank)
        src_anchor = perturbation_indices(
            tokens, np.array([[anchor_pos]]), config.perturb, special, config.target_rank
        )
        width = max(src_pairs.shape[1], src_anchor.shape[1])
        src = np.full((len(chosen) + 1, width), -1, dtype=np.int64)
        src[0, : src_anchor.shape[1]] = src_anchor[0]
        src[1:, : src_pairs.shape[1]] = src_pairs
        gene_tok = np.concatenate([[tokens[anchor_pos]], tokens[chosen]])
        ranks = np.concatenate([[rank_of[anchor_pos]], rank_of[chosen]])
        perturbed = np.concatenate([[[tokens[anchor_pos]] * 2], tokens[pairs]]) if len(chosen) else np.array([[tokens[anchor_pos]] * 2])
        anchor_only = np.zeros(len(chosen) + 1, dtype=bool)
        anchor_only[0] = True
        names = [vocab.tokens[t] for t in gene_tok.tolist()]
        return _Variants(src, gene_tok, ranks, names, perturbed, anchor_only)
    src = perturbation_indices(tokens, chosen[:, None], config.perturb, special, config.target_rank)
    gene_tok = tokens[chosen]
    return _Variants(
        src,
        gene_tok,
        rank_of[chosen],
        [vocab.tokens[t] for t in gene_tok.tolist()],
        gene_tok[:, None],
        np.zeros(len(chosen), dtype=bool),
    )


# --------------------------------------------------------------------------------------------
# Running the encoder
# --------------------------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def _forward(
    bert: torch.nn.Module,
    ids: np.ndarray,
    mask: np.ndarray,
    special_ids: np.ndarray,
    config: PerturbConfig,
    device: torch.device,
    want_hidden: bool = False,
    first_block: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Cell embeddings (and token states) of one padded batch.

    ``first_block``: the batch's states after the first encoder block when already known
    (:class:`~mixgeneformer.deletion.DeletionScan`); the encoder then continues from there.
    """
    ids_t = torch.from_numpy(ids).to(device)
    mask_t = torch.from_numpy(mask).to(device)
    if first_block is None:
        hidden = hidden_at_layer(bert, ids_t, mask_t, config.layer)
    else:
        hidden = continue_encoder(bert, first_block, mask_t, 1, config.layer)
    cells = pool_cells(hidden, ids_t, mask_t, special_ids, config.pooling)
    return cells.double().cpu().numpy(), (hidden.float() if want_hidden else None)


@dataclasses.dataclass
class _CellJob:
    """One cell queued for perturbation and its result arrays."""

    row: int  # row in the input dataset
    tokens: np.ndarray
    variants: _Variants
    embedding: np.ndarray  # original cell embedding, float64
    hidden: torch.Tensor | None = None  # original token states (gene shifts only)
    emb: np.ndarray | None = None  # (n_variants, hidden) perturbed embeddings, float64
    scan: DeletionScan | None = None  # shared first block, when every variant deletes one token
    deleted: np.ndarray | None = None  # (n_variants,) position each variant deletes (with scan)
    gene_rows: list = dataclasses.field(default_factory=list)  # (variant, affected token, shift)
    cell_emb: np.ndarray | None = None  # (n_variants,) Geneformer's cell_emb score (score="cell_emb")


def _variant_batches(jobs: Iterator[_CellJob], batch_size: int) -> Iterator[list[tuple[_CellJob, slice]]]:
    """Group the variants of consecutive cells into batches of ``batch_size`` rows."""
    pending: list[tuple[_CellJob, slice]] = []
    filled = 0
    for job in jobs:
        n = len(job.variants.src)
        start = 0
        while start < n:
            take = min(batch_size - filled, n - start)
            pending.append((job, slice(start, start + take)))
            filled += take
            start += take
            if filled == batch_size:
                yield pending
                pending, filled = [], 0
    if pending:
        yield pending


def _run_variants(
    bert: torch.nn.Module,
    jobs: Iterator[_CellJob],
    vocab: Vocabulary,
    config: PerturbConfig,
    device: torch.device,
    on_done,
) -> None:
    """Embed every variant of ``jobs`` in batches, calling ``on_done(job)`` when a cell is complete."""
    special = vocab.special_ids
    pad = vocab.pad_id
    remaining: dict[int, int] = {}
    shareable = layers_to_run(len(bert.encoder.layer), config.layer) >= 1 and supports_shared_first_block(bert)
    for batch in _variant_batches(jobs, config.batch_size):
        pieces = []
        for job, part in batch:
            if job.emb is None:
                job.emb = np.full((len(job.variants.src), bert.config.hidden_size), np.nan)
                if config.score == "cell_emb":
                    job.cell_emb = np.full(len(job.variants.src), np.nan)
                remaining[id(job)] = len(job.variants.src)
                job.deleted = _single_deletions(job.variants.src, len(job.tokens)) if shareable else None
                if job.deleted is not None and len(job.deleted) >= _MIN_SCAN_VARIANTS:
                    job.scan = DeletionScan(bert, torch.from_numpy(job.tokens.astype(np.int64)).to(device))
            src = job.variants.src[part]
            identity = _identity_rows(src, len(job.tokens))
            pieces.append((job, part, src, identity))
        todo = [(job, part, src, ident) for job, part, src, ident in pieces]
        widths = [int((src >= 0).sum(axis=1).max()) for _, _, src, _ in todo]
        width = max(widths)
        n_rows = sum(len(src) for _, _, src, _ in todo)
        ids = np.full((n_rows, width), pad, dtype=np.int64)
        origin = np.full((n_rows, width), -1, dtype=np.int64)
        at = 0
        for job, _part, src, _ident in todo:
            s = src[:, :width] if src.shape[1] >= width else np.pad(src, ((0, 0), (0, width - src.shape[1])), constant_values=-1)
            valid = s >= 0
            ids[at : at + len(s)][valid] = job.tokens[s[valid]]
            origin[at : at + len(s)] = s
            at += len(s)
        mask = (origin >= 0).astype(np.int64)
        first_block = None
        if all(job.scan is not None for job, _, _, _ in todo):
            states = [job.scan.first_block(job.deleted[part]) for job, part, _, _ in todo]
            first_block = states[0].new_zeros((n_rows, width, states[0].shape[-1]))
            at = 0
            for block in states:
                first_block[at : at + len(block), : block.shape[1]] = block
                at += len(block)
        emb, hidden = _forward(
            bert, ids, mask, special, config, device, want_hidden=config.needs_gene_states, first_block=first_block
        )
        at = 0
        for job, part, src, ident in todo:
            n = len(src)
            block = emb[at : at + n]
            block[ident] = job.embedding  # a perturbation of nothing: exactly the original
            job.emb[part] = block
            if hidden is not None:
                rows, cols, cos = _remaining_gene_cosines(job, part, hidden[at : at + n], origin[at : at + n], ids[at : at + n], special)
                if config.gene_shifts:
                    job.gene_rows.append((np.arange(part.start, part.stop)[rows], ids[at : at + n][rows, cols], 1.0 - cos))
                if job.cell_emb is not None:
                    with np.errstate(invalid="ignore"):
                        mean = np.bincount(rows, weights=cos, minlength=n) / np.bincount(rows, minlength=n)
                    job.cell_emb[part] = np.where(ident, 1.0, mean)
            at += n
            remaining[id(job)] -= n
            if remaining[id(job)] == 0:
                del remaining[id(job)]
                job.scan = None
                on_done(job)


#: Fewest single deletions of a cell for which sharing the first block pays for its set-up.
_MIN_SCAN_VARIANTS = 4


def _single_deletions(src: np.ndarray, length: int) -> np.ndarray | None:
    """The position each row of ``src`` deletes when every row deletes exactly one token, else None."""
    if src.ndim != 2 or src.shape[1] != length - 1 or len(src) == 0:
        return None
    kept = np.arange(length - 1)
    moved = src != kept
    deleted = np.where(moved.any(axis=1), moved.argmax(axis=1), length - 1)
    expected = kept + (kept[None, :] >= deleted[:, None])
    return deleted if np.array_equal(src, expected) else None


def _identity_rows(src: np.ndarray, length: int) -> np.ndarray:
    if src.shape[1] != length:
        return np.zeros(len(src), dtype=bool)
    return (src == np.arange(length)).all(axis=1)


def _remaining_gene_cosines(job, part, hidden, origin, ids, special) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cos(state before, state after) of every gene a variant keeps unperturbed: (rows, cols, cos)."""
    valid = (origin >= 0) & ~np.isin(ids, special)
    perturbed = job.variants.perturbed_tokens[part]
    valid &= ~(ids[:, :, None] == perturbed[:, None, :]).any(-1)
    rows, cols = np.nonzero(valid)
    before = job.hidden[torch.from_numpy(origin[rows, cols])]
    after = hidden[torch.from_numpy(rows), torch.from_numpy(cols)]
    cos = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1).cpu().numpy()
    return rows, cols, cos


# --------------------------------------------------------------------------------------------
# The user API
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PerturbationResult:
    """What :func:`perturb_cells` returns.

    Attributes
    ----------
    cells
        One row per (cell, perturbation): ``cell`` (dataset row), ``state``, ``perturbed`` (token
        name, ``a+b`` for a set), ``gene_token``, ``gene_rank`` (rank in the original cell),
        ``n_genes``, ``shift``, ``goal_shift`` / ``alt_shift:<state>`` when states are given,
        ``anchor_shift`` with an anchor, ``exact`` (and ``*_estimate``) in screening mode.
    gene_shifts
        With ``gene_shifts=True``: mean shift of each affected gene's state per perturbed gene
        (``perturbed``, ``affected_token``, ``affected``, ``n_cells``, ``mean_gene_shift``).
    summary
        Counts: cells perturbed, skipped (gene absent), dropped (too few genes), variants, time.
    """

    cells: pd.DataFrame
    gene_shifts: pd.DataFrame | None
    summary: dict[str, Any]


def perturb_cells(
    model: torch.nn.Module,
    dataset: datasets.Dataset | Sequence[Sequence[int]],
    vocab: Vocabulary,
    config: PerturbConfig | None = None,
    states: Sequence[str] | None = None,
    progress: bool = True,
) -> PerturbationResult:
    """Perturb tokenized cells and score how their embeddings move.

    Parameters
    ----------
    model
        ``MixGeneformerForPretraining``, ``BertForMaskedLM`` or ``BertModel``.
    dataset
        Tokenized corpus (column ``input_ids``, plus ``config.state_column`` when states are
        used), or a list of token id sequences.
    vocab
        The model's vocabulary.
    config
        :class:`PerturbConfig` (defaults: delete every gene of every cell).
    states
        Cell states aligned with ``dataset`` (overrides ``config.state_column``'s column).
    progress
        Show a progress bar over cells.

    Returns
    -------
    PerturbationResult
        Per-(cell, perturbation) scores in a deterministic order (dataset row, then gene rank).
    """
    import time

    config = config or PerturbConfig()
    started = time.perf_counter()
    bert = encoder_of(model)
    layers_to_run(len(bert.encoder.layer), config.layer)
    device = resolve_device(config.device)
    flat, offsets = _read_tokens(dataset)
    lengths = np.diff(offsets)
    _check_cells(flat, lengths, bert, vocab)
    labels = _state_labels(dataset, config, states, len(lengths))
    gene_tokens = resolve_genes(config.genes, vocab, _species_for(dataset, config)) if config.genes else None
    anchor_token = (
        int(resolve_genes([config.anchor], vocab, _species_for(dataset, config))[0]) if config.anchor else None
    )
    special = vocab.special_ids
    n_genes = _genes_per_cell(flat, offsets, special)

    chosen, state_rows = _select_cells(labels, config, len(lengths))
    too_small = chosen[n_genes[chosen] < config.min_genes]
    if len(too_small):
        logger.warning("dropping %d cells with fewer than %d genes", len(too_small), config.min_genes)
    chosen = chosen[n_genes[chosen] >= config.min_genes]
    shard_index, num_shards = config.shard()
    mine = chosen[shard_index::num_shards]

    def sequences(rows: np.ndarray) -> list[np.ndarray]:
        return [flat[offsets[r] : offsets[r + 1]] for r in rows.tolist()]

    was_training = model.training
    model.eval()
    try:
        # State means from every state cell (identical on every shard), plus this shard's originals.
        need = np.unique(np.concatenate([mine, *state_rows.values()])) if state_rows else mine
        with torch.inference_mode():
            base = (
                embed_corpus(
                    model, sequences(need), vocab, config.layer, config.pooling,
                    config.batch_size, device, progress=False, precision=config.precision,
                ).astype(np.float64)
                if len(need)
                else np.zeros((0, bert.config.hidden_size))
            )
        model.eval()
        base_of = {int(r): base[i] for i, r in enumerate(need.tolist())}
        targets = {
            name: np.mean([base_of[int(r)] for r in rows], axis=0) for name, rows in state_rows.items()
        }
        if config.mode == "screen":
            frame, summary = _screen(bert, flat, offsets, mine, base_of, targets, vocab, config, device, progress)
            gene_frame = None
        else:
            frame, gene_frame, summary = _exact(
                bert, flat, offsets, mine, base_of, targets, vocab, config, device, gene_tokens, anchor_token, progress
            )
    finally:
        model.train(was_training)
    frame.insert(1, "n_genes", n_genes[frame["cell"].to_numpy()])
    if labels is not None:
        frame.insert(1, "state", np.asarray(labels, dtype=object)[frame["cell"].to_numpy()])
    summary.update(
        cells_selected=int(len(chosen)),
        cells_dropped_few_genes=int(len(too_small)),
        shard=[shard_index, num_shards],
        seconds=round(time.perf_counter() - started, 3),
    )
    return PerturbationResult(frame, gene_frame, summary)


def _read_tokens(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 tokens, int64 offsets of n+1) of a corpus or a list of token sequences."""
    if isinstance(dataset, (list, tuple)):
        lengths = np.fromiter((len(seq) for seq in dataset), dtype=np.int64, count=len(dataset))
        flat = np.concatenate([np.asarray(seq, dtype=np.int64) for seq in dataset]) if len(dataset) else np.zeros(0, np.int64)
        return flat, np.concatenate([[0], np.cumsum(lengths)])
    if "input_ids" not in (getattr(dataset, "column_names", None) or ()):
        raise InputDataError(
            f"the corpus has no 'input_ids' column (columns: {getattr(dataset, 'column_names', None)}); "
            "tokenize it with mixgeneformer.tokenize"
        )
    column = dataset.with_format("arrow")[:].column("input_ids").combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    return np.asarray(column.flatten(), dtype=np.int64), offsets - offsets[0]


def _check_cells(flat: np.ndarray, lengths: np.ndarray, bert: torch.nn.Module, vocab: Vocabulary) -> None:
    """Errors for inputs the model cannot read: no cells, empty cells, too long, foreign token ids."""
    from .errors import VocabularyMismatchError

    if len(lengths) == 0:
        raise InputDataError("there are no cells to perturb")
    if (lengths == 0).any():
        raise InputDataError(f"{int((lengths == 0).sum())} cells have no tokens (first at row {int(np.argmax(lengths == 0))})")
    max_positions = int(bert.config.max_position_embeddings)
    if lengths.max() > max_positions:
        raise InputDataError(
            f"cell {int(np.argmax(lengths))} has {int(lengths.max())} tokens but the model accepts at most "
            f"{max_positions}; tokenize with max_len<={max_positions}"
        )
    if len(vocab) != int(bert.config.vocab_size):
        raise VocabularyMismatchError(
            f"the vocabulary has {len(vocab)} tokens but the model's vocab_size is {bert.config.vocab_size}; "
            "use the vocabulary saved in the model bundle"
        )
    if flat.size and (flat.min() < 0 or flat.max() >= len(vocab)):
        raise InputDataError(
            f"token ids range over [{int(flat.min())}, {int(flat.max())}] but the vocabulary has {len(vocab)} "
            "tokens; the cells were tokenized with another vocabulary"
        )


def _species_for(dataset: Any, config: PerturbConfig) -> str:
    if config.species != "auto":
        return config.species
    names = getattr(dataset, "column_names", ()) or ()
    if "species" in names and len(dataset):
        values = pd.Series(dataset["species"]).value_counts()
        if len(values) and values.index[0] in ("human", "mouse"):
            return str(values.index[0])
    return "auto"


def _state_labels(dataset: Any, config: PerturbConfig, states: Sequence[str] | None, n: int) -> np.ndarray | None:
    if states is not None:
        labels = np.asarray(states, dtype=object)
    elif config.state_column:
        names = list(getattr(dataset, "column_names", None) or [])
        if config.state_column not in names:
            raise InputDataError(
                f"state_column {config.state_column!r} is not a column of the corpus (columns: {names}); "
                "tokenize with obs_columns including it or choose another column"
            )
        labels = np.asarray(dataset[config.state_column], dtype=object)
    else:
        return None
    if len(labels) != n:
        raise InputDataError(f"{len(labels)} state labels for {n} cells; give one label per cell")
    labels = np.where(pd.isna(labels), None, labels.astype(str)).astype(object)
    present = sorted({str(x) for x in labels if x is not None})
    for field in ("start", "goal"):
        value = getattr(config, field)
        if value is not None and value not in present:
            raise InputDataError(f"{field} state {value!r} has no cells in {config.state_column!r}; states: {present}")
    for value in config.alternatives:
        if value not in present:
            raise InputDataError(f"alternative state {value!r} has no cells in {config.state_column!r}; states: {present}")
    return labels


def _select_cells(
    labels: np.ndarray | None, config: PerturbConfig, n: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows to perturb, and rows of each named state (goal / alternatives; at most cells_per_state)."""
    if labels is None:
        return np.arange(n), {}
    rng_seed = config.seed

    def rows_of(state: str) -> np.ndarray:
        rows = np.flatnonzero(labels == state)
        if config.cells_per_state is not None and len(rows) > config.cells_per_state:
            # A per-state seed, so a state's sample does not depend on which other states exist.
            rng = np.random.default_rng([rng_seed, sum(state.encode())])
            rows = np.sort(rng.choice(rows, config.cells_per_state, replace=False))
        return rows

    state_rows = {}
    for name in [config.goal, *config.alternatives]:
        if name is not None:
            state_rows[name] = rows_of(name)
    if config.start is not None:
        chosen = rows_of(config.start)
    else:
        chosen = np.arange(n)
        if config.cells_per_state is not None:
            chosen = np.sort(np.concatenate([rows_of(s) for s in sorted({str(x) for x in labels if x is not None})]))
    return chosen, state_rows


def _genes_per_cell(flat: np.ndarray, offsets: np.ndarray, special: np.ndarray) -> np.ndarray:
    is_gene = ~np.isin(flat, special)
    counts = np.add.reduceat(is_gene.astype(np.int64), offsets[:-1]) if len(flat) else np.zeros(len(offsets) - 1, np.int64)
    counts[np.diff(offsets) == 0] = 0
    return counts


def _score_columns(
    original: np.ndarray, perturbed: np.ndarray, targets: dict[str, np.ndarray], config: PerturbConfig
) -> dict[str, np.ndarray]:
    """shift / goal_shift / alt_shift:<state> of perturbed embeddings (rows) of one cell."""
    unchanged = (perturbed == original[None, :]).all(axis=1)  # a perturbation of nothing scores 0
    columns = {"shift": np.where(unchanged, 0.0, 1.0 - _cosine(original[None, :], perturbed))}
    for name, target in targets.items():
        key = "goal_shift" if name == config.goal else f"alt_shift:{name}"
        change = _cosine(perturbed, target[None, :]) - _cosine(original[None, :], target[None, :])
        columns[key] = np.where(unchanged, 0.0, change)
    return columns


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cell", desc=desc, dynamic_ncols=True)


def _length_order(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Rows longest first (stable), so consecutive batches hold sequences of similar length."""
    lengths = np.diff(offsets)[rows]
    return rows[np.argsort(-lengths, kind="stable")]


def _exact(bert, flat, offsets, rows, base_of, targets, vocab, config, device, gene_tokens, anchor_token, progress):
    """Every variant through the encoder; returns (cell table, gene-shift table, summary)."""
    frames: list[pd.DataFrame] = []
    gene_frames: list[pd.DataFrame] = []
    counts = {"cells_perturbed": 0, "cells_skipped_gene_absent": 0, "variants": 0}
    bar = _progress(len(rows), progress, f"perturb ({config.perturb})")

    def jobs() -> Iterator[_CellJob]:
        for row in _length_order(rows, offsets).tolist():
            tokens = flat[offsets[row] : offsets[row + 1]]
            variants = cell_variants(tokens, vocab, config, gene_tokens, anchor_token)
            if variants is None or len(variants.src) == 0:
                counts["cells_skipped_gene_absent"] += 1
                if bar is not None:
                    bar.update(1)
                continue
            job = _CellJob(row, tokens, variants, base_of[row])
            if config.needs_gene_states:
                ids = torch.from_numpy(tokens[None, :].astype(np.int64)).to(device)
                job.hidden = hidden_at_layer(bert, ids, torch.ones_like(ids), config.layer)[0].float()
            yield job

    def done(job: _CellJob) -> None:
        v = job.variants
        columns = _score_columns(job.embedding, job.emb, targets, config)
        if job.cell_emb is not None:
            columns["cell_emb"] = job.cell_emb
            columns["cell_emb_shift"] = 1.0 - job.cell_emb
        if anchor_token is not None:
            columns["anchor_shift"] = 1.0 - _cosine(job.emb[v.anchor_only][0][None, :], job.emb)
        label = np.asarray(v.label, dtype=object)
        if anchor_token is not None:
            anchor_name = vocab.tokens[anchor_token]
            label = np.where(v.anchor_only, label, anchor_name + "+" + label.astype(str)).astype(object)
        frame = pd.DataFrame(
            {"cell": job.row, "perturbed": label, "gene_token": v.gene_token, "gene_rank": v.gene_rank, **columns}
        )
        frames.append(frame)
        if job.gene_rows:
            variant, affected, shift = (np.concatenate(parts) for parts in zip(*job.gene_rows, strict=True))
            gene_frames.append(
                pd.DataFrame({"cell": job.row, "perturbed": label[variant], "affected_token": affected, "gene_shift": shift})
            )
        counts["cells_perturbed"] += 1
        counts["variants"] += len(v.src)
        job.hidden = None
        job.emb = None
        job.cell_emb = None
        if bar is not None:
            bar.update(1)

    try:
        with torch.inference_mode(), inference_context(device, config.precision):
            _run_variants(bert, jobs(), vocab, config, device, done)
    finally:
        if bar is not None:
            bar.close()
    frame = _sorted_cells(frames, targets, config, anchor=anchor_token is not None)
    gene_frame = _gene_shift_table(gene_frames, vocab) if config.gene_shifts else None
    return frame, gene_frame, counts


def _sorted_cells(frames: list[pd.DataFrame], targets: dict, config: PerturbConfig, anchor: bool) -> pd.DataFrame:
    if frames:
        frame = pd.concat(frames, ignore_index=True)
    else:
        score_cols = ["shift"] + [
            "goal_shift" if name == config.goal else f"alt_shift:{name}" for name in targets
        ] + (["cell_emb", "cell_emb_shift"] if config.score == "cell_emb" else []) + (["anchor_shift"] if anchor else [])
        frame = pd.DataFrame({"cell": pd.Series(dtype=np.int64), "perturbed": pd.Series(dtype=object),
                              "gene_token": pd.Series(dtype=np.int64), "gene_rank": pd.Series(dtype=np.int64),
                              **{c: pd.Series(dtype=np.float64) for c in score_cols}})
    # Deterministic order whatever the batching or sharding: dataset row, then gene rank.
    return frame.sort_values(["cell", "gene_rank", "perturbed"], kind="stable").reset_index(drop=True)


def _gene_shift_table(gene_frames: list[pd.DataFrame], vocab: Vocabulary) -> pd.DataFrame:
    if not gene_frames:
        return pd.DataFrame(columns=["perturbed", "affected_token", "affected", "n_cells", "mean_gene_shift"])
    long = pd.concat(gene_frames, ignore_index=True)
    table = (
        long.groupby(["perturbed", "affected_token"], sort=True)
        .agg(n_cells=("cell", "nunique"), mean_gene_shift=("gene_shift", "mean"))
        .reset_index()
    )
    table.insert(2, "affected", np.asarray(vocab.tokens, dtype=object)[table["affected_token"].to_numpy()])
    return table.sort_values(["perturbed", "mean_gene_shift"], ascending=[True, False], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Fast screening: first-order estimates of every single-gene deletion
# --------------------------------------------------------------------------------------------
def _probe_directions(embedding: np.ndarray, n_probes: int, seed: int) -> np.ndarray:
    """(1 + n_probes, d): the unit embedding, then random orthonormal directions orthogonal to it."""
    d = len(embedding)
    n_probes = min(n_probes, d - 1)
    rng = np.random.default_rng(seed)
    basis = np.concatenate([embedding[:, None], rng.standard_normal((d, n_probes))], axis=1)
    q, _ = np.linalg.qr(basis)
    q[:, 0] *= np.sign(q[:, 0] @ embedding) or 1.0
    return q.T


def screen_deletions(
    bert: torch.nn.Module,
    tokens: np.ndarray,
    embedding: np.ndarray,
    targets: dict[str, np.ndarray],
    vocab: Vocabulary,
    config: PerturbConfig,
    device: torch.device,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """First-order estimates of every single-gene deletion of one cell (see the module docstring).

    Parameters
    ----------
    bert
        The encoder.
    tokens
        (length,) token ids of the cell.
    embedding
        The cell's exact (unperturbed) embedding.
    targets
        State name -> mean state embedding (goal / alternatives).
    seed
        Seed of the random probe directions.

    Returns
    -------
    dict
        ``gene_token``, ``gene_rank``, ``shift`` and one ``goal_shift`` / ``alt_shift:<state>``
        per state, each (n_genes,) in rank order.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    special = vocab.special_ids
    gene_pos = np.flatnonzero(~np.isin(tokens, special))
    first, last = int(gene_pos[0]), int(gene_pos[-1])
    if last - first + 1 != len(gene_pos):
        raise InputDataError("screening needs the genes of a cell in one contiguous block (as the tokenizer writes them)")
    embedding = np.asarray(embedding, dtype=np.float64)
    probes = _probe_directions(embedding, config.screen_probes, seed)
    names = list(targets)
    embeddings = encoder_of(bert).embeddings
    if config.screen_method == "shift":
        # Base z: the last gene deleted (exact); then t_j -> t_{j+1} on [p, last) linearised.
        base = np.delete(tokens, last)
        at_base, grad_x, _ = _readout_gradients(bert, base, probes, targets, vocab, config, device, relax=False)
        weight = embeddings.word_embeddings.weight.detach().double()
        tok = torch.from_numpy(tokens).to(device)
        delta = weight[tok[first + 1 : last + 1]] - weight[tok[first:last]]  # W[t_{j+1}] - W[t_j]
        contrib = (grad_x[:, first:last] * delta[None]).sum(-1)  # (n_readouts, n_genes - 1)
        suffix = torch.flip(torch.cumsum(torch.flip(contrib, [1]), 1), [1])  # sum over j >= p
        change = torch.cat([suffix, torch.zeros_like(suffix[:, :1])], dim=1)  # last gene: exact
    else:
        # Base x: removing gene p = its presence weight 1 -> 0 (attention and pooling), plus the
        # tokens after it moving one position up: P[j-1] - P[j] at every position j > p.
        at_base, grad_x, grad_m = _readout_gradients(bert, tokens, probes, targets, vocab, config, device, relax=True)
        positions = embeddings.position_embeddings.weight.detach().double()[: len(tokens)]
        step = positions[:-1] - positions[1:]  # P[j-1] - P[j] for j = 1..L-1
        contrib = (grad_x[:, 1:] * step[None]).sum(-1)  # (n_readouts, L - 1), index j-1
        after = torch.flip(torch.cumsum(torch.flip(contrib, [1]), 1), [1])  # after[:, j-1] = sum_{i>=j}
        after = torch.cat([after, torch.zeros_like(after[:, :1])], dim=1)  # after[:, p] = sum_{j>p}
        change = after[:, gene_pos] - grad_m[:, gene_pos]
    estimate = at_base.double().cpu().numpy()[:, None] + change.cpu().numpy()  # read-outs at every deletion
    n_probe = len(probes) - 1
    parallel = estimate[0]  # e·ê after deletion
    orthogonal_sq = (len(embedding) - 1) / max(n_probe, 1) * (estimate[1 : 1 + n_probe] ** 2).sum(0)
    cos_est = parallel / np.sqrt(parallel**2 + orthogonal_sq)
    result = {"gene_token": tokens[gene_pos], "gene_rank": np.arange(len(gene_pos)), "shift": 1.0 - cos_est}
    for i, name in enumerate(names):
        key = "goal_shift" if name == config.goal else f"alt_shift:{name}"
        original = float(_cosine(embedding[None, :], targets[name][None, :])[0])
        result[key] = estimate[1 + n_probe + i] - original
    return result


def _readout_gradients(bert, tokens, probes, targets, vocab, config, device, relax):
    """Read-outs of one sequence's embedding and their input gradients (one batched backward).

    Read-outs: ``probes @ e`` then ``cos(e, state)`` per state. Returns the read-outs, their
    gradients with respect to the word-embedding output at each position (n_readouts, L, d)
    and, with ``relax``, with respect to each position's presence weight (n_readouts, L): a
    weight scales the token's attention (additive log-weight on the keys) and its pooling weight.
    """
    bert = encoder_of(bert)
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)[None, :]).to(device)
    mask = torch.ones_like(ids)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = bert.embeddings.word_embeddings.register_forward_hook(hook)
    try:
        with torch.enable_grad(), inference_context(device, config.precision):
            if relax:
                presence = torch.ones(ids.shape, dtype=torch.float32, device=device, requires_grad=True)
                hidden = bert.embeddings(input_ids=ids)
                bias = torch.log(presence)[:, None, None, :].to(hidden.dtype)
                for block in bert.encoder.layer[: layers_to_run(len(bert.encoder.layer), config.layer)]:
                    out = block(hidden, bias)
                    hidden = out[0] if isinstance(out, tuple) else out
                if config.pooling == "cls":
                    e = hidden[0, 0].double()
                else:
                    weights = (presence * ~torch.isin(ids, torch.as_tensor(vocab.special_ids, device=device)))[0]
                    e = (hidden[0].double() * weights[:, None]).sum(0) / weights.sum()
            else:
                hidden = hidden_at_layer(bert, ids, mask, config.layer)
                e = pool_cells(hidden, ids, mask, vocab.special_ids, config.pooling)[0].double()
            readouts = [torch.as_tensor(probes, device=device) @ e]
            for state in targets.values():
                goal = torch.as_tensor(state, device=device)
                readouts.append((e @ goal / (e.norm() * goal.norm()))[None])
            out = torch.cat(readouts)
            eye = torch.eye(len(out), dtype=out.dtype, device=device)
            inputs = (captured[0], presence) if relax else (captured[0],)
            grads = torch.autograd.grad(out, inputs, grad_outputs=eye, is_grads_batched=True)
    finally:
        handle.remove()
    grad_x = grads[0][:, 0].double()
    grad_m = grads[1][:, 0].double() if relax else None
    return out.detach(), grad_x, grad_m


def _screen(bert, flat, offsets, rows, base_of, targets, vocab, config, device, progress):
    """Screening mode: estimates for all single-gene deletions, top-k re-scored exactly."""
    score = "goal_shift" if config.goal else "shift"
    estimates: dict[int, dict[str, np.ndarray]] = {}
    order = _length_order(rows, offsets).tolist()
    bar = _progress(len(order), progress, "screen (first order)")
    was_grad = [p.requires_grad for p in bert.parameters()]
    for p in bert.parameters():
        p.requires_grad_(False)  # only input gradients are needed
    try:
        for row in order:
            tokens = flat[offsets[row] : offsets[row + 1]]
            estimates[row] = screen_deletions(
                bert, tokens, base_of[row], targets, vocab, config, device, seed=config.seed * 1_000_003 + row
            )
            if bar is not None:
                bar.update(1)
    finally:
        for p, flag in zip(bert.parameters(), was_grad, strict=True):
            p.requires_grad_(flag)
        if bar is not None:
            bar.close()

    exact: dict[int, dict[str, np.ndarray]] = {}

    def jobs() -> Iterator[_CellJob]:
        for row in order:
            est = estimates[row]
            k = min(config.screen_top_k, len(est[score]))
            if k == 0:
                continue
            top = np.sort(np.argsort(-est[score], kind="stable")[:k])  # gene ranks to re-score
            tokens = flat[offsets[row] : offsets[row + 1]]
            gene_pos = np.flatnonzero(~np.isin(tokens, vocab.special_ids))
            src = perturbation_indices(tokens, gene_pos[top][:, None], "delete", vocab.special_ids)
            variants = _Variants(src, tokens[gene_pos[top]], top, [], tokens[gene_pos[top]][:, None], np.zeros(k, bool))
            yield _CellJob(row, tokens, variants, base_of[row])

    def done(job: _CellJob) -> None:
        exact[job.row] = {"gene_rank": job.variants.gene_rank, **_score_columns(job.embedding, job.emb, targets, config)}

    with torch.inference_mode(), inference_context(device, config.precision):
        _run_variants(bert, jobs(), vocab, config, device, done)

    frames = []
    for row in sorted(estimates):
        est = estimates[row]
        n = len(est["gene_token"])
        frame = {"cell": np.full(n, row), "perturbed": np.asarray(vocab.tokens, dtype=object)[est["gene_token"]],
                 "gene_token": est["gene_token"], "gene_rank": est["gene_rank"]}
        keys = [k for k in est if k not in ("gene_token", "gene_rank")]
        is_exact = np.zeros(n, dtype=bool)
        if row in exact:
            is_exact[exact[row]["gene_rank"]] = True
        for key in keys:
            value = est[key].copy()
            if row in exact:
                value[exact[row]["gene_rank"]] = exact[row][key]
            frame[key] = value
        frame["exact"] = is_exact
        for key in keys:
            frame[f"{key}_estimate"] = est[key]
        frames.append(pd.DataFrame(frame))
    frame = _sorted_cells(frames, targets, config, anchor=False)
    counts = {
        "cells_perturbed": len(estimates),
        "cells_skipped_gene_absent": 0,
        "variants": int(len(frame)),
        "variants_exact": int(frame["exact"].sum()) if len(frame) else 0,
    }
    return frame, counts


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_results(
    out_dir: str | os.PathLike,
    result: PerturbationResult,
    stats: pd.DataFrame | None,
    config: PerturbConfig,
    vocab: Vocabulary | None = None,
    figure: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a run's tables (parquet + CSV), summary, config and ranking figure, atomically.

    Files: ``cells.parquet`` (per cell and perturbation), ``genes.parquet`` / ``genes.csv`` (the
    statistics), ``gene_shifts.parquet`` (when measured), ``summary.json``, ``config.yaml``,
    ``ranking.png``.
    """
    from .config import save_config
    from .fileio import atomic_directory, write_json

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        result.cells.to_parquet(tmp / "cells.parquet", index=False)
        if result.gene_shifts is not None:
            result.gene_shifts.to_parquet(tmp / "gene_shifts.parquet", index=False)
        if stats is not None:
            stats.to_parquet(tmp / "genes.parquet", index=False)
            stats.to_csv(tmp / "genes.csv", index=False)
            if figure and len(stats):
                from .plots import perturbation_ranking

                score = "mean_" + stats.attrs.get("score", "shift")
                label = "symbol" if "symbol" in stats.columns and (stats["symbol"] != "").any() else "perturbed"
                perturbation_ranking(
                    stats.assign(label=np.where(stats.get("symbol", "") != "", stats.get("symbol", ""), stats["perturbed"]))
                    if label == "symbol" else stats,
                    top=20, score=score, label="label" if label == "symbol" else "perturbed",
                    fdr="fdr" if "fdr" in stats.columns else None,
                    title=f"in silico {config.perturb}: {score}", save=tmp / "ranking.png",
                )
        write_json(tmp / "summary.json", {**result.summary, "vocab_hash": vocab.hash if vocab else None})
        save_config(config, tmp)
    return Path(out_dir)


def merge_shards(tables: Sequence[pd.DataFrame | str | os.PathLike]) -> pd.DataFrame:
    """Concatenate per-shard cell tables (DataFrames or parquet paths) in the deterministic order."""
    frames = [pd.read_parquet(t) if not isinstance(t, pd.DataFrame) else t for t in tables]
    if not frames:
        raise InputDataError("no shard tables to merge")
    frame = pd.concat(frames, ignore_index=True)
    if frame.duplicated(["cell", "perturbed"]).any():
        raise InputDataError("shard tables overlap (a cell appears in two shards); merge each shard once")
    return frame.sort_values(["cell", "gene_rank", "perturbed"], kind="stable").reset_index(drop=True)


def perturb_anndata(
    adata: anndata.AnnData,
    model_or_bundle: str | os.PathLike | torch.nn.Module,
    config: PerturbConfig | None = None,
    *,
    vocab: Vocabulary | None = None,
    medians=None,
    tokenize_config=None,
    stats_mode: StatsMode = "vs_all",
    progress: bool = True,
) -> tuple[PerturbationResult, pd.DataFrame]:
    """Tokenize an AnnData with the model bundle's vocabulary and medians, then perturb it.

    Parameters
    ----------
    adata
        Raw counts (cells × genes); not modified.
    model_or_bundle
        A model bundle folder (``model.load_bundle``) or a loaded model (then pass ``vocab`` and
        ``medians``).
    config
        :class:`PerturbConfig`; ``state_column`` names an ``obs`` column.
    tokenize_config
        :class:`mixgeneformer.tokenize.TokenizeConfig` (``max_len`` capped at the model's).
    stats_mode
        ``"vs_all"`` or ``"aggregate"`` (``vs_null`` needs a second run: use
        :func:`perturbation_statistics`).

    Returns
    -------
    (PerturbationResult, pandas.DataFrame)
        The per-cell table (``cell`` = obs position, plus ``obs_name``) and the statistics.
    """
    from .embed import load_for_inference
    from .tokenize import tokenize_for_model

    config = config or PerturbConfig()
    model, vocab, medians, tokenize_config, _ = load_for_inference(model_or_bundle, vocab, medians, tokenize_config)
    if config.state_column and config.state_column not in adata.obs.columns:
        raise InputDataError(
            f"state_column {config.state_column!r} is not an obs column; obs columns: {list(adata.obs.columns)}"
        )
    columns = [config.state_column] if config.state_column else []
    max_positions = int(encoder_of(model).config.max_position_embeddings)
    corpus, obs_rows, _ = tokenize_for_model(adata, vocab, medians, tokenize_config, max_positions, obs_columns=columns)
    result = perturb_cells(model, corpus, vocab, config, progress=progress)
    result.cells["cell"] = obs_rows[result.cells["cell"].to_numpy()]
    result.cells.insert(1, "obs_name", np.asarray(adata.obs_names, dtype=object)[result.cells["cell"].to_numpy()])
    stats = perturbation_statistics(
        result.cells, vocab, mode="aggregate" if stats_mode == "vs_null" else stats_mode, score=config.statistics_score
    )
    return result, stats
