"""Pretraining losses: masked-gene prediction and the contrastive terms (pure torch).

Nothing here knows about genes, vocabularies or transformers; every loss takes tensors and
returns a scalar tensor that keeps the autograd graph. The cross-species pairing's tensor pieces
live here too (ortholog projection, species votes, rank-weighted ortholog profiles, mutual nearest
partners): the model holds the lookup tables and passes them in. Similarities are computed in float32 even
when the encoder runs in bf16: with a temperature of 0.05 the logits reach ±20 and bf16 would
round them to a step of ~0.1.

Distributed negatives (``gather=True``) gather the rows of every rank with plain ``dist``
collectives in an autograd function whose backward all-reduces the gradient and hands each rank
the part for its own rows, so the negatives from other GPUs are trained too (ranks may hold
different batch sizes); the local rows are the queries, the gathered rows the keys.
(``torch.distributed.nn.functional.all_gather``, deprecated, made gloo processes abort at exit
now and then.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def _without_autocast(fn: _F) -> _F:
    """Run ``fn`` with autocast switched off on its tensors' device.

    Under the Trainer's bf16 / fp16 mixed precision the whole forward runs in autocast, which would
    turn the similarity matmuls below into bf16 products (logits of ±20 at a step of ~0.1, and on
    CPU a dtype clash in ``index_put``): the float32 promised above must switch autocast off here.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, tuple) else (a,))
                      if isinstance(t, torch.Tensor)), None)
        with autocast_off(first.device.type if first is not None else "cpu"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Autocast switched off on ``device_type`` (a device without autocast has nothing to switch off)."""
    if not torch.amp.is_autocast_available(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


@_without_autocast
def linear_without_autocast(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """``layer(x)`` in the layer's own dtype (float32) whatever the autocast: the fine-tuning head. Its probe
    initialisation folds the feature standardisation into the bias, so its logits are differences of large
    terms that a bf16 product (Trainer bf16 = autocast) rounds away."""
    return layer(x.to(layer.weight.dtype))


@_without_autocast
def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the vocabulary at the labelled (masked) positions.

    Parameters
    ----------
    logits
        ``(..., vocab_size)`` prediction scores, e.g. ``(batch, seq, vocab)`` or
        ``(n_positions, vocab)``.
    labels
        Integer tensor with the shape of ``logits`` minus its last dimension; the original token
        where a position was masked, ``-100`` elsewhere.

    Returns
    -------
    torch.Tensor
        Mean cross-entropy over labelled positions (float32). A batch without any labelled
        position gives ``0`` (still attached to the graph) instead of NaN.
    """
    vocab_size = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab_size)
    flat_labels = labels.reshape(-1)
    # Sum / count instead of a data-dependent branch: no host sync, no graph break under compile.
    total = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat_labels != IGNORE_INDEX).sum().clamp(min=1)


class _AllGatherRows(torch.autograd.Function):
    """Rows of ``x`` from every rank, concatenated in rank order (ranks may hold different counts).

    Backward: each rank's gradient with respect to the whole concatenation is summed over ranks
    (all-reduce) and the rows this rank contributed are returned, so a rank's rows get the
    gradient of every rank's loss through them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        import torch.distributed as dist

        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        ctx.start, ctx.rows = sum(counts[:rank]), x.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.start : ctx.start + ctx.rows], None, None


def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every rank (autograd-aware); return it and the row where this rank's rows start."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    rank = dist.get_rank()
    counts = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device))
    counts = [int(c) for c in torch.cat(counts).tolist()]
    return _AllGatherRows.apply(x, counts, rank), sum(counts[:rank])


def _queries_and_keys(a: torch.Tensor, b: torch.Tensor, gather: bool, name: str):
    """L2-normalized float32 queries of ``a`` and ``b`` and their keys (from every rank with ``gather``)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"{name} expects two (B, D) tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    qa = F.normalize(a.float(), dim=-1)
    qb = F.normalize(b.float(), dim=-1)
    if not gather:
        return qa, qb, qa, qb, 0
    # One gather (and one row-count exchange) for both sides.
    keys, offset = _gather_with_grad(torch.cat([qa, qb], dim=1))
    ka, kb = keys.split(qa.shape[1], dim=1)
    return qa, qb, ka, kb, offset


@_without_autocast
def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05, gather: bool = False
) -> torch.Tensor:
    """SimCSE / SimCLR NT-Xent loss over the ``2B`` embeddings of two views.

    Every embedding is a query; its positive is the other view of the same cell, its negatives
    are every other embedding of both views (the query itself is excluded)::

        z = normalize([z1; z2])                       # 2B x D
        s_ij = z_i . z_j / temperature,  s_ii = -inf
        loss = mean_i  -log softmax_j(s_ij)[pos(i)],  pos(i) = i + B mod 2B

    Parameters
    ----------
    z1, z2
        ``(B, D)`` embeddings of the two views; row ``i`` of both is the same cell.
    temperature
        Softmax temperature (SimCSE: 0.05).
    gather
        If True and ``torch.distributed`` is initialised, keys come from all ranks (with
        gradients); the local ``2B`` rows stay the queries, their targets offset to this rank's rows.

    Returns
    -------
    torch.Tensor
        Scalar float32 loss.
    """
    batch = z1.shape[0]
    q1, q2, k1, k2, offset = _queries_and_keys(z1, z2, gather, "nt_xent")
    n_global = k1.shape[0]
    queries = torch.cat([q1, q2], dim=0)  # 2B x D
    keys = torch.cat([k1, k2], dim=0)  # 2N x D, N = rows over all ranks
    logits = queries @ keys.T / temperature
    local = torch.arange(batch, device=z1.device) + offset
    self_index = torch.cat([local, local + n_global])
    positive = torch.cat([local + n_global, local])
    rows = torch.arange(2 * batch, device=z1.device)
    logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=z1.device))
    return F.cross_entropy(logits, positive)


@_without_autocast
def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.1,
    gather: bool = False,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired embeddings ``a[i] <-> b[i]`` (CLIP-style).

    ``loss = ½ [CE(norm(a) norm(b)ᵀ / τ, diag) + CE(norm(b) norm(a)ᵀ / τ, diag)]``; the negatives
    of ``a[i]`` are all other ``b`` rows and vice versa.

    Parameters
    ----------
    a, b
        ``(B, D)`` embeddings; row ``i`` of both describes the same cell.
    temperature
        Softmax temperature (τ≈0.1 for the cross-species term).
    gather
        Take keys from every rank (with gradients), targets offset to this rank's rows.
    valid
        Optional ``(B,)`` bool mask: rows that are False are not used as queries (they stay
        negatives). Used for cells that have no gene with a 1:1 ortholog.

    Returns
    -------
    torch.Tensor
        Scalar float32 loss; ``0`` (attached to the graph) when no row is valid.
    """
    batch = a.shape[0]
    qa, qb, ka, kb, offset = _queries_and_keys(a, b, gather, "info_nce")
    target = torch.arange(batch, device=a.device) + offset
    logits_ab = qa @ kb.T / temperature
    logits_ba = qb @ ka.T / temperature
    if valid is None:
        return 0.5 * (F.cross_entropy(logits_ab, target) + F.cross_entropy(logits_ba, target))
    valid = valid.to(device=a.device, dtype=torch.bool)
    if not bool(valid.any()):
        return (qa.sum() + qb.sum()) * 0.0
    loss_ab = F.cross_entropy(logits_ab[valid], target[valid])
    loss_ba = F.cross_entropy(logits_ba[valid], target[valid])
    return 0.5 * (loss_ab + loss_ba)


def project_to_orthologs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    ortholog_lookup: torch.Tensor,
    special_lookup: torch.Tensor,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-express each cell in the other species: genes → 1:1 ortholog tokens (``ortholog_lookup``,
    -1 none), others dropped.

    Rank order is kept, dropped genes close up (stable compaction), the rest is padded; the
    length never grows. Returns ``(ids, mask, valid)``: ``valid`` is False for cells left
    without any gene (they get one attended pad token so attention stays finite, and are not
    scored).
    """
    mapped = ortholog_lookup[input_ids]
    keep = attention_mask.bool() & (mapped >= 0)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    ids = mapped.gather(1, order)
    mask = keep.gather(1, order)
    ids = ids.masked_fill(~mask, pad_id)
    valid = (mask & ~special_lookup[ids]).any(dim=1)
    empty = ~mask.any(dim=1)
    mask[:, 0] |= empty
    return ids, mask.to(attention_mask.dtype), valid


def species_marks(token_species: torch.Tensor, species_tokens: list[int | None]) -> torch.Tensor:
    """Per token the species it marks (``token_species`` 0 human / 1 mouse, and the species tokens
    ``species_tokens[code]``), -1 for shared and special tokens: the input of :func:`cell_species`."""
    marks = torch.where((token_species == 0) | (token_species == 1), token_species, torch.full_like(token_species, -1))
    for code, token in enumerate(species_tokens):
        if token is not None:
            marks[token] = code
    return marks


def ortholog_classes(ortholog_map: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """Per token the class of its one-to-one ortholog pair (the smaller token id of the two), -1 for none."""
    ids = torch.arange(ortholog_map.numel(), device=ortholog_map.device)
    paired = (ortholog_map >= 0) & ~special.to(ortholog_map.device)
    return torch.where(paired, torch.minimum(ids, ortholog_map), torch.full_like(ids, -1))


def cell_species(marks: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` species of each cell by a vote of its tokens' ``marks`` (``(B, L)``: 0 human, 1 mouse,
    -1 neither); -1 where no attended token marks it or the vote ties."""
    marks = marks.masked_fill(~attention_mask.bool(), -1)
    human = (marks == 0).sum(1)
    mouse = (marks == 1).sum(1)
    species = torch.where(mouse > human, 1, 0)
    return torch.where(human == mouse, torch.full_like(species, -1), species)


def rank_weights(classes: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` weight ``1/log2(position + 2)`` of each attended token with a class (``classes`` >= 0), else 0."""
    keep = attention_mask.bool() & (classes >= 0)
    positions = torch.arange(classes.shape[1], device=classes.device, dtype=torch.float32)
    return (1.0 / torch.log2(positions + 2.0)).expand(classes.shape) * keep


def sparse_rows_to_dense(classes: torch.Tensor, weights: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(B, n_classes)``: each row's ``weights`` summed into its ``classes`` (-1 / weight 0 adds nothing)."""
    dense = torch.zeros(classes.shape[0], n_classes, device=classes.device)
    return dense.scatter_add_(1, classes.clamp_min(0), weights.float())


def sparse_row_norms(classes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(B,)`` L2 norms of the rows :func:`sparse_rows_to_dense` would build, without the ``(B, n_classes)`` matrix.

    Weights of a class that recurs within a row are summed first (each row sorted by class, each run
    of one class summed into its own slot), so the result equals the dense norm in every case.
    """
    ordered, order = classes.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.long)
    starts[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).long()
    sums = torch.zeros(classes.shape, device=classes.device).scatter_add_(1, starts.cumsum(1) - 1, weights.float().gather(1, order))
    return sums.square().sum(1).sqrt()


def rank_weighted_profiles(classes: torch.Tensor, attention_mask: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(B, n_classes)`` profiles: each attended token adds ``1/log2(position + 2)`` to its class
    (``classes``: ``(B, L)``, -1 for tokens of no class)."""
    return sparse_rows_to_dense(classes, rank_weights(classes, attention_mask), n_classes)


@_without_autocast
def mutual_nearest_partners(profiles: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
    """Each cell's mutual nearest neighbour of the other species, by cosine of ``profiles``.

    Parameters
    ----------
    profiles
        ``(B, C)`` non-negative cell profiles in a space both species share (e.g. rank-weighted
        one-to-one-ortholog genes).
    species
        ``(B,)`` int: 0 / 1, or -1 where unknown (such cells get no partner).

    Returns
    -------
    torch.Tensor
        ``(B,)`` long: the partner's row, or -1 (no cell of the other species, no shared gene, or
        the nearest neighbour's own nearest neighbour is another cell).
    """
    with torch.no_grad():
        unit = F.normalize(profiles.float(), dim=-1)
        sim = unit @ unit.T
        known = species >= 0
        other = (species[:, None] != species[None, :]) & known[:, None] & known[None, :]
        sim = sim.masked_fill(~other, float("-inf"))
        best = sim.argmax(dim=1)
        best_sim = sim.gather(1, best[:, None]).squeeze(1)
        rows = torch.arange(profiles.shape[0], device=profiles.device)
        mutual = (best.gather(0, best) == rows) & (best_sim > 0) & torch.isfinite(best_sim)
        return torch.where(mutual, best, torch.full_like(best, -1))


@_without_autocast
def sparse_cosine(
    query: tuple[torch.Tensor, torch.Tensor, torch.Tensor], pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_classes: int
) -> torch.Tensor:
    """``(Q, N)`` cosine between two sets of sparse profiles, each ``(classes, weights, norms)``:
    ``(rows, L)`` class ids (-1: none) and weights, ``(rows,)`` profile norms.

    The queries are scattered into a dense ``(n_classes, Q)`` table once; each pool row's dot
    products are then one weighted ``embedding_bag`` sum over its classes' table rows (on CPU 5x
    faster than gathering an ``(N, L, Q)`` tensor, and nothing of that size is allocated).
    """
    q_classes, q_weights, q_norms = query
    classes, weights, norms = pool
    table = torch.zeros(n_classes, q_classes.shape[0], device=classes.device)
    columns = torch.arange(q_classes.shape[0], device=classes.device)[:, None].expand_as(q_classes)
    table.index_put_((q_classes.clamp_min(0), columns), q_weights.float(), accumulate=True)
    dots = F.embedding_bag(classes.clamp_min(0), table, per_sample_weights=weights.float(), mode="sum").T
    return dots / (q_norms.float().clamp_min(1e-12)[:, None] * norms.float().clamp_min(1e-12)[None, :])


def mutual_nearest_in_pool(
    classes: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, species: torch.Tensor, n_queries: int, n_classes: int,
    k: int = 1,
) -> torch.Tensor:
    """:func:`mutual_nearest_partners` for the first ``n_queries`` rows of a larger pool of cells.

    The pool (the batch, then a :class:`mixgeneformer.cell_bank.CellBank` of earlier cells) is held
    sparse: ``classes`` / ``weights`` ``(N, L)`` from :func:`rank_weights`, ``norms`` ``(N,)`` the
    norms of the rows' profiles, ``species`` ``(N,)`` (-1: unknown or an empty slot, never paired).
    A query's partner is its nearest cell of the other species in the whole pool, kept only when
    the query is among that cell's own ``k`` nearest cells of the query's species in the whole
    pool (``k=1``: mutual nearest neighbours; a larger ``k`` pairs more cells, as MNN batch
    correction does with k=20).

    Returns
    -------
    torch.Tensor
        ``(n_queries,)`` long: the partner's row in the pool, or -1.
    """
    with torch.no_grad():
        rows = torch.arange(n_queries, device=classes.device)
        known = species >= 0

        def other_species_cosine(query_rows: torch.Tensor) -> torch.Tensor:
            query = (classes[query_rows], weights[query_rows], norms[query_rows])
            sim = sparse_cosine(query, (classes, weights, norms), n_classes)
            other = (species[query_rows][:, None] != species[None, :]) & known[query_rows][:, None] & known[None, :]
            return sim.masked_fill(~other, float("-inf"))

        sim = other_species_cosine(rows)
        best = sim.argmax(dim=1)
        best_sim = sim.gather(1, best[:, None]).squeeze(1)
        back = other_species_cosine(best)
        if k <= 1:
            reciprocal = back.argmax(dim=1) == rows
        else:
            reciprocal = (back.topk(min(k, back.shape[1]), dim=1).indices == rows[:, None]).any(dim=1)
        mutual = reciprocal & (best_sim > 0) & torch.isfinite(best_sim)
        return torch.where(mutual, best, torch.full_like(best, -1))


@_without_autocast
def cross_species_nce(
    z: torch.Tensor, partner: torch.Tensor, temperature: float = 0.1, bank: torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE that pulls each cell toward its cross-species partner, against every other cell.

    For every cell ``i`` with ``partner[i] >= 0`` the logits are ``cos(z_i, z_k) / temperature``
    over all other cells ``k`` of the batch (itself excluded), the target being the partner. Its
    own species' cells are negatives too, so the partner must come closer than they are: the
    species have to overlap, not merely line up side by side (a species-wide offset of the
    embedding costs loss). Mean over cells with a partner; ``0`` (attached to the graph) when
    none has one.

    ``bank`` ``(P, D)``: detached embeddings of earlier cells (a memory bank). A ``partner`` of
    ``B + j`` then means bank row ``j``; that one row joins the logits as the positive (the other
    bank rows are not negatives: many are cells of the same type).
    """
    unit = F.normalize(z.float(), dim=-1)
    anchors = partner >= 0
    if not bool(anchors.any()):
        return unit.sum() * 0.0
    rows = torch.nonzero(anchors).squeeze(1)
    batch = z.shape[0]
    logits = unit[rows] @ unit.T / temperature
    logits = logits.index_put((torch.arange(rows.numel(), device=z.device), rows), torch.tensor(float("-inf"), device=z.device))
    target = partner[rows]
    if bank is not None:
        in_bank = target >= batch
        keys = F.normalize(bank.float(), dim=-1)[(target - batch).clamp(0, bank.shape[0] - 1)]
        extra = ((unit[rows] * keys).sum(-1) / temperature).masked_fill(~in_bank, float("-inf"))
        logits = torch.cat([logits, extra[:, None]], dim=1)
        target = torch.where(in_bank, torch.full_like(target, batch), target)
    return F.cross_entropy(logits, target)


@_without_autocast
def simcse_pp_dimension_loss(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Dimension-wise term of SimCSE++ (a cross-correlation / decorrelation objective).

    Each embedding dimension is standardised over the batch, giving ``ẑ1, ẑ2`` (mean 0, std 1
    per column). With the ``D x D`` cross-correlation ``C = ẑ1ᵀ ẑ2 / B``::

        loss = (1/D) Σ_d (1 − C_dd)²  +  (1/(D(D−1))) Σ_{d≠e} C_de²

    The first part makes each dimension agree between the two views, the second keeps different
    dimensions uncorrelated, so no dimension collapses or dominates the cosine similarity. Both
    parts are averages, so the value is O(1) whatever the hidden size; the model weights it by
    ``config.simcse_pp_weight`` (0.1).

    Parameters
    ----------
    z1, z2
        ``(B, D)`` embeddings of the two views, ``B >= 2``.
    eps
        Added to the variance before the square root.

    Returns
    -------
    torch.Tensor
        Scalar float32 loss (0 for a batch of one cell, where correlations are undefined).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"simcse_pp_dimension_loss expects two (B, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    batch, dim = z1.shape
    if batch < 2:
        return (z1.sum() + z2.sum()).float() * 0.0

    def standardise(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        z = z - z.mean(dim=0, keepdim=True)
        return z / torch.sqrt(z.var(dim=0, unbiased=False, keepdim=True) + eps)

    corr = standardise(z1).T @ standardise(z2) / batch
    diagonal = torch.diagonal(corr)
    on_diag = (1.0 - diagonal).pow(2).mean()
    if dim == 1:
        return on_diag
    off_diag = (corr.pow(2).sum() - diagonal.pow(2).sum()) / (dim * (dim - 1))
    return on_diag + off_diag
