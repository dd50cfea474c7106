"""Genes to perturb and the perturbed cells, as gather indices into each cell's tokens (pure functions)."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, GeneIdError, InputDataError
from ..genes import map_gene_ids, strip_versions
from ..vocab import HUMAN, MOUSE
from .config import PerturbConfig, PerturbType

if TYPE_CHECKING:

    from ..vocab import Vocabulary


logger = logging.getLogger(__name__)

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)


def resolve_genes(names: Sequence[str], vocab: Vocabulary, species: str = "auto",
                  cells_species: str | None = None) -> np.ndarray:
    """Token ids of genes given as Ensembl IDs (versions allowed) or symbols.

    Parameters
    ----------
    names
        Gene identifiers; symbols are resolved in ``species`` (``"auto"``: human first, then
        mouse, exact case before case-insensitive).
    vocab
        The model's vocabulary.
    cells_species
        ``"human"`` / ``"mouse"``: every cell is of that species; a gene of the other is mapped to
        its one-to-one ortholog, or refused when it has none (no cell could hold it).

    Returns
    -------
    numpy.ndarray
        int64 token ids aligned with ``names``.

    Raises
    ------
    GeneIdError
        A name is unknown or its gene is not in the vocabulary.
    ConfigError
        Two names are the same gene (a symbol and its Ensembl ID count as one).
    """

    out = np.empty(len(names), dtype=np.int64)
    order = ["human", "mouse"] if species in ("auto", "human") else ["mouse", "human"]
    if species != "auto" and cells_species is None:  # else a symbol of the other species is mapped (_in_species)
        order = order[:1]
    for i, raw in enumerate(names):
        name = str(raw).strip()
        candidates: list[str] = []
        hints: list[str] = []
        if _ENSEMBL.match(name):
            candidates = [str(strip_versions(np.array([name.upper()], dtype=object))[0])]
        else:
            for sp in order:
                try:
                    mapped = map_gene_ids([name], species=sp, min_coverage=0.0).ensembl_ids[0]
                except GeneIdError as error:  # e.g. a mouse symbol with species="human": says so
                    mapped, hints = "", [*hints, str(error)]
                if mapped:
                    candidates.append(str(mapped))
            if not candidates:
                raise GeneIdError(
                    f"gene {name!r} is neither an Ensembl ID nor a known {'/'.join(order)} gene symbol; "
                    "check the spelling or pass its Ensembl ID (ENSG…/ENSMUSG…)" + "".join(f". {h}" for h in hints)
                )
        tokens = [vocab.gene_to_id[c] for c in candidates if c in vocab.gene_to_id]
        if not tokens:
            raise GeneIdError(
                f"gene {name!r} ({', '.join(candidates)}) is not in the model's vocabulary "
                f"({len(vocab.gene_to_id):,} genes); it cannot be perturbed with this model"
            )
        out[i] = tokens[0] if cells_species is None else _in_species(name, tokens[0], vocab, cells_species)
    _refuse_repeats(names, out)
    return out


def _in_species(name: str, token: int, vocab: Vocabulary, cells_species: str) -> int:
    """``token``, or its one-to-one ortholog's when it is a gene of the other species than the cells'."""
    own, other = (HUMAN, "mouse") if cells_species == "human" else (MOUSE, "human")
    if int(vocab.token_species[token]) != 1 - own:
        return int(token)
    partner = int(vocab.ortholog_map[token])
    gene = "/".join(vocab.token_genes[token])
    if partner < 0:
        raise GeneIdError(
            f"gene {name!r} ({gene}) is a {other} gene with no one-to-one {cells_species} ortholog in the model's "
            f"vocabulary, and the cells are {cells_species}: no cell holds it. Name a {cells_species} gene "
            f"(a {cells_species} symbol or Ensembl ID) instead."
        )
    logger.warning("gene %r (%s) is a %s gene; the cells are %s: perturbing its one-to-one ortholog %s",
                   name, gene, other, cells_species, "/".join(vocab.token_genes[partner]))
    return partner


def _refuse_repeats(names: Sequence[str], tokens: np.ndarray) -> None:
    """A gene named twice (also as a symbol and its ID) would be perturbed and scored twice per cell."""
    _, first, counts = np.unique(tokens, return_index=True, return_counts=True)
    if (counts > 1).any():
        same = [[str(names[j]) for j in np.flatnonzero(tokens == tokens[k])] for k in first[counts > 1]]
        raise ConfigError(
            f"genes name one gene more than once ({'; '.join(' = '.join(group) for group in same)}): each would be "
            "perturbed and scored twice per cell. List each gene once."
        )


# long: a 28-line docstring; the body (50 lines) builds the gather index of each perturbation kind.
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
        up in (``activate`` / ``inhibit``: of the genes that move; a gene already past the target
        rank in the move's direction stays where it is).
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
    NoGeneLeftError
        A deletion would leave the cell with no gene (an InputDataError).
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
            raise NoGeneLeftError(
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
    # Overexpression puts the whole set first, in the listed order (Geneformer's); a set already
    # there is unchanged. Activation never lowers a gene, inhibition never raises one: such genes
    # stay in place and the others form the block.
    if perturb == "overexpress":
        moves = np.ones(targets.shape, dtype=bool)
    else:
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


class NoGeneLeftError(InputDataError):
    """A deletion would leave the cell without a gene (the engine skips and counts such a cell)."""


@dataclasses.dataclass
class _Variants:
    """All perturbed copies of one cell: gather indices plus what each row perturbs."""

    src: np.ndarray  # (n, width) int64
    gene_token: np.ndarray  # (n,) token perturbed (partner gene with an anchor; -1 for a set)
    gene_rank: np.ndarray  # (n,) its rank in the original cell (-1 for a set)
    label: list[str]  # (n,) human-readable name of the perturbed token(s)
    perturbed_tokens: np.ndarray  # (n, k) every token the row perturbs (for gene shifts)
    anchor_only: np.ndarray  # (n,) bool, the anchor-alone reference row
    # Tokens the cell lacks that rows insert (overexpress_absent="insert"): src value len(tokens) + j
    # stands for extra[j].
    extra: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def pool(self, tokens: np.ndarray) -> np.ndarray:
        """The tokens ``src`` indexes: the cell's, then any inserted ones."""
        return np.concatenate([tokens, self.extra]) if len(self.extra) else tokens


def insert_first(tokens: np.ndarray, items: Sequence[int], special_ids: np.ndarray, max_len: int | None) -> np.ndarray:
    """Gather index of ``tokens`` with ``items`` first among its genes, in that order (Geneformer's
    overexpression of listed genes).

    ``items`` are positions in ``tokens`` (genes the cell has: moved) or ``len(tokens) + j`` (the
    ``j``-th gene it lacks: inserted). Leading special tokens (``<cls>``, species) stay first and
    trailing ones (``<eos>``) last; a cell longer than ``max_len`` after insertion loses its
    lowest-ranked genes.
    """
    length = len(tokens)
    is_gene = ~np.isin(tokens, special_ids)
    first = int(np.argmax(is_gene))
    stop = length - int(np.argmax(is_gene[::-1]))  # one past the last gene
    items = [int(i) for i in items]
    taken = set(items)
    order = [*range(first), *items, *(p for p in range(first, stop) if p not in taken), *range(stop, length)]
    if max_len is not None and len(order) > max_len:
        tail = length - stop
        if max_len - tail < first + len(items):
            raise InputDataError(
                f"overexpressing {len(items)} gene(s) needs {first + len(items) + tail} positions but the model "
                f"accepts {max_len}; overexpress fewer genes"
            )
        order = order[: max_len - tail] + order[len(order) - tail :]
    return np.asarray(order, dtype=np.int64)


def _overexpress_inserting(
    tokens: np.ndarray, vocab: Vocabulary, config: PerturbConfig, gene_tokens: np.ndarray,
    positions: np.ndarray, rank_of: np.ndarray, max_len: int | None,
) -> _Variants:
    """Variants of ``overexpress_absent="insert"``: ``positions`` (aligned with ``gene_tokens``)
    holds each listed gene's position in the cell, -1 where the cell lacks it (then inserted)."""
    absent = positions < 0
    slot = np.where(absent, len(tokens) + np.cumsum(absent) - 1, positions)
    special = vocab.special_ids
    if config.combine:
        rows = [insert_first(tokens, slot, special, max_len)]
        token, rank = np.array([-1]), np.array([-1])
        names, perturbed = ["+".join(vocab.tokens[t] for t in gene_tokens.tolist())], gene_tokens[None, :]
    else:
        rows = [insert_first(tokens, [s], special, max_len) for s in slot.tolist()]
        token, rank = gene_tokens, np.where(absent, -1, rank_of[np.maximum(positions, 0)])
        names, perturbed = [vocab.tokens[t] for t in gene_tokens.tolist()], gene_tokens[:, None]
    src = np.full((len(rows), max(len(r) for r in rows)), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        src[i, : len(row)] = row
    return _Variants(src, token, rank, names, perturbed, np.zeros(len(rows), dtype=bool), gene_tokens[absent])


# long: one branch per perturbation kind (single, combined, anchored), all on one cell's tokens.
def cell_variants(
    tokens: np.ndarray,
    vocab: Vocabulary,
    config: PerturbConfig,
    gene_tokens: np.ndarray | None = None,
    anchor_token: int | None = None,
    max_len: int | None = None,
) -> _Variants | None:
    """Every variant ``config`` asks for of one cell, or None when the cell lacks the genes.

    ``gene_tokens`` (resolved ``config.genes``) None means every gene of the cell. A gene absent
    from the cell is skipped; with ``combine`` or an ``anchor`` the cell must hold all of the
    set / the anchor. With ``overexpress_absent="insert"`` an absent listed gene is inserted first
    instead, the cell cut to ``max_len`` tokens (the model's positions) if it grows past it.
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
        if config.perturb == "overexpress" and config.overexpress_absent == "insert" and not found.all():
            positions = np.where(found, gene_pos[sorter[where]], -1)
            return _overexpress_inserting(tokens, vocab, config, gene_tokens, positions, rank_of, max_len)
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
