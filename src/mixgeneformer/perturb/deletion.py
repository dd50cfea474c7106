"""Exact single-gene deletions with the first encoder block shared by all variants of a cell.

Deleting the token at position ``p`` of a cell ``t_0 … t_{L-1}`` gives the sequence
``t_0 … t_{p-1}, t_{p+1} … t_{L-1}`` at positions ``0 … L-2``. Its input to the first encoder
block is therefore made of two per-cell tables (BERT's embeddings are per token and position):

* ``X_i`` = embedding of ``t_i`` at position ``i`` (the original cell), used for ``i < p``;
* ``S_i`` = embedding of ``t_{i+1}`` at position ``i`` (the cell shifted up by one), for ``i ≥ p``.

So the first block's queries, keys and values of every deletion are rows of the projections of
``X`` and ``S``, computed once per cell. Its attention is shared too: query row ``i`` of deletion
``p`` attends to keys ``X_j`` for ``j < p`` and ``S_j`` for ``j ≥ p``, so with a per-row constant
``m`` (any upper bound of the logits; softmax does not depend on it)

    context_i(p) = N_i(p) / D_i(p),
    N_i(p) = Σ_{j<p} e^{s(q_i, kX_j) - m_i} vX_j + Σ_{j≥p} e^{s(q_i, kS_j) - m_i} vS_j

(``D`` the same without ``v``), and going from ``p`` to ``p + 1`` moves one key from the ``S``
sum to the ``X`` sum. Walking ``p`` upwards through a cell updates ``N`` and ``D`` by one key
each step: the first block's attention for all ``L - 1`` deletions of a cell costs about as
much as for two sequences instead of ``L - 1`` of them (its QKV projection, likewise, is done
twice instead of ``L - 1`` times). The running sums are kept in float64, the rest in float32;
the result equals the sequence-by-sequence forward pass to float32 rounding (tested to 1e-5).

Only the first block is shared: its outputs differ at every position between deletions, so
blocks 2 … n run per variant. On a 6-layer, 256-wide model pooled at layer -2 this removes about
an eighth of the work of an all-genes deletion scan.

This module is pure torch (no I/O); :mod:`mixgeneformer.perturb` uses it for single-gene
deletions.
"""

from __future__ import annotations

import functools

import torch

from ..losses import autocast_off

__all__ = ["DeletionScan", "supports_shared_first_block"]

# Keys per chunk when a whole cell's logits are reduced (bounds memory to heads × L × chunk).
_KEY_CHUNK = 512
# Deletions per contraction when advancing the running sums (bounds heads × L × n × (d + 1)).
_POSITION_CHUNK = 16


def _chunks(start: int, stop: int) -> list[slice]:
    """``[start, stop)`` cut into slices of at most ``_KEY_CHUNK`` keys."""
    return [slice(i, min(i + _KEY_CHUNK, stop)) for i in range(start, stop, _KEY_CHUNK)]


def supports_shared_first_block(bert: torch.nn.Module) -> bool:
    """Whether ``bert`` (a ``transformers.BertModel``) has the layout :class:`DeletionScan` assumes.

    Absolute position embeddings, an encoder (not a decoder) and BERT's self-attention module
    with ``query`` / ``key`` / ``value`` projections in its first block.
    """
    config = getattr(bert, "config", None)
    if config is None or getattr(config, "position_embedding_type", "absolute") != "absolute" or getattr(config, "is_decoder", False):
        return False
    blocks = getattr(getattr(bert, "encoder", None), "layer", None)
    if not blocks:
        return False
    attention = getattr(blocks[0], "attention", None)
    self_attention = getattr(attention, "self", None)
    return all(hasattr(self_attention, name) for name in ("query", "key", "value")) and hasattr(
        attention, "output"
    ) and hasattr(blocks[0], "feed_forward_chunk")


def _without_autocast(method):
    """Run a :class:`DeletionScan` method with autocast off on the scan's device: its attention sums are
    float32 / float64 by design. Under ``precision="bf16"`` the perturbation runs in bf16 autocast, which
    turned these matmuls into bf16 products and made the in-place ``baddbmm_`` of float32 sums with bf16
    key weights fail ("Input dtypes must be the same"): every bf16 deletion scan crashed."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with autocast_off(self.device.type):
            return method(self, *args, **kwargs)

    return wrapper


class DeletionScan:
    """First-block outputs of single-token deletions of one cell, sharing work across deletions.

    Parameters
    ----------
    bert
        A ``transformers.BertModel`` in eval mode (see :func:`supports_shared_first_block`).
    tokens
        (length,) int64 token ids of the cell, on the model's device.

    Call :meth:`first_block` with deletion positions, ideally in increasing order across calls
    (the running sums move forward; a smaller position restarts them from the cell's start).
    """

    def __init__(self, bert: torch.nn.Module, tokens: torch.Tensor) -> None:
        if tokens.ndim != 1 or len(tokens) < 2:
            raise ValueError("a deletion scan needs one cell of at least 2 tokens")
        self.block = bert.encoder.layer[0]
        attention = self.block.attention.self
        self.heads = int(attention.num_attention_heads)
        self.head_dim = int(attention.attention_head_size)
        self.scale = float(getattr(attention, "scaling", self.head_dim**-0.5))
        self.length = int(len(tokens))
        self.device = tokens.device
        embeddings = bert.embeddings
        x = embeddings(input_ids=tokens[None, :])[0]  # (L, h)
        s = embeddings(input_ids=tokens[None, 1:])[0]  # (L-1, h)
        self.inputs = {"X": x, "S": s}
        self.q: dict[str, torch.Tensor] = {}
        self.k: dict[str, torch.Tensor] = {}
        self.v1: dict[str, torch.Tensor] = {}  # values with a column of ones: (H, n, d + 1)
        for name, states in self.inputs.items():
            self.q[name] = self._heads(attention.query(states))
            self.k[name] = self._heads(attention.key(states))
            v = self._heads(attention.value(states))
            self.v1[name] = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        # Per query row, an upper bound of its logits over every key of X and S.
        self.row_max = {a: self._row_bound(a) for a in ("X", "S")}
        self._reset()

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        """(n, H*d) -> (H, n, d) in float32."""
        n = projected.shape[0]
        return projected.reshape(n, self.heads, self.head_dim).permute(1, 0, 2).float()

    def _logits(self, a: str, b: str, keys: slice) -> torch.Tensor:
        """Scaled logits of queries of ``a`` against keys ``keys`` of ``b``: (H, n_a, n_keys)."""
        return torch.matmul(self.q[a], self.k[b][:, keys].transpose(1, 2)) * self.scale

    def _weights(self, a: str, b: str, keys: slice) -> torch.Tensor:
        """exp(logit - row bound) of queries of ``a`` against keys ``keys`` of ``b``: (H, n_a, n_keys)."""
        return torch.exp(self._logits(a, b, keys) - self.row_max[a][..., None])

    @_without_autocast
    def _row_bound(self, a: str) -> torch.Tensor:
        """Each query row's largest logit over every key of X and S: (H, n_a)."""
        best = None
        for b in ("X", "S"):
            for keys in _chunks(0, self.k[b].shape[1]):
                chunk = self._logits(a, b, keys).amax(-1)
                best = chunk if best is None else torch.maximum(best, chunk)
        return best

    @_without_autocast
    def _reset(self) -> None:
        """Running sums at p = 0: every key comes from S."""
        self.position = 0
        self.sums = {}
        for a in ("X", "S"):
            total = torch.zeros(self.heads, self.q[a].shape[1], self.head_dim + 1, dtype=torch.float64, device=self.q[a].device)
            for keys in _chunks(0, self.length - 1):
                total += torch.matmul(self._weights(a, "S", keys), self.v1["S"][:, keys]).double()
            self.sums[a] = total  # (H, n_a, d + 1), float64: it accumulates over the whole scan

    @_without_autocast
    def _advance(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums at each of ``positions`` (sorted, all ≥ the current position): (H, n_a, n, d + 1).

        Keys ``j`` in ``[self.position, positions[-1])`` move from S to X; each requested
        position's sums are the current ones plus the moves of the keys below it, done as one
        contraction of the key weights with the values placed in one column block per position.
        The moves of one call are float32 (a few keys each); the running sums stay float64.
        """
        start, stop = self.position, int(positions[-1])
        n, width = len(positions), self.head_dim + 1
        moved = {a: torch.zeros(self.heads, self.q[a].shape[1], n * width, device=positions.device) for a in ("X", "S")}
        for keys in _chunks(start, stop):
            # Key j belongs to the first requested position above it; the per-position block
            # sums are cumulated below.
            owner = torch.searchsorted(positions, torch.arange(keys.start, keys.stop, device=positions.device), right=True)
            for b, sign in (("X", 1.0), ("S", -1.0)):  # keys join X and leave S
                placed = torch.zeros(self.heads, keys.stop - keys.start, n, width, device=positions.device)
                placed[:, torch.arange(keys.stop - keys.start), owner] = self.v1[b][:, keys]
                placed = placed.reshape(self.heads, -1, n * width)
                for a in ("X", "S"):
                    moved[a].baddbmm_(self._weights(a, b, keys), placed, alpha=sign)
        out = {}
        for a in ("X", "S"):
            base = self.sums[a].float()[:, :, None, :]
            if stop > start:
                steps = moved[a].reshape(self.heads, -1, n, width).cumsum(dim=2)
                self.sums[a] += steps[:, :, -1].double()
                out[a] = steps.add_(base)
            else:
                out[a] = base.expand(-1, -1, n, -1)
        self.position = stop
        return out

    def first_block(self, positions) -> torch.Tensor:
        """Output of the first encoder block for the deletion of each position: (n, L - 1, hidden).

        ``positions`` index tokens of the cell (any order; the result follows it).
        """
        device = self.inputs["X"].device
        positions = torch.as_tensor(positions, dtype=torch.int64, device=device).reshape(-1)
        if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= self.length):
            raise ValueError(f"deletion positions must lie in [0, {self.length})")
        order = torch.argsort(positions, stable=True)
        sorted_positions = positions[order]
        if len(sorted_positions) and int(sorted_positions[0]) < self.position:
            self._reset()
        pieces = []
        for start in range(0, len(sorted_positions), _POSITION_CHUNK):
            chunk = sorted_positions[start : start + _POSITION_CHUNK]
            sums = self._advance(chunk)
            pieces.append(self._block_output(chunk, sums))
        result = torch.cat(pieces) if pieces else self.inputs["S"].new_zeros((0, self.length - 1, self.inputs["S"].shape[-1]))
        return result[torch.argsort(order)]

    def _block_output(self, positions: torch.Tensor, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """Finish the first block (output projection, residual, feed-forward) for ``positions``."""
        n_rows = self.length - 1
        before = torch.arange(n_rows, device=positions.device)[None, :] < positions[:, None]  # (n, L-1)
        context = {}
        for a in ("X", "S"):
            total = sums[a][:, :n_rows].permute(2, 1, 0, 3)  # (n, L-1, H, d + 1)
            context[a] = total[..., :-1] / total[..., -1:]
        merged = torch.where(before[:, :, None, None], context["X"], context["S"])  # (n, L-1, H, d)
        dtype = self.inputs["S"].dtype
        merged = merged.reshape(len(positions), n_rows, self.heads * self.head_dim).to(dtype)
        residual = torch.where(before[..., None], self.inputs["X"][None, :n_rows], self.inputs["S"][None])
        attended = self.block.attention.output(merged, residual)
        out = self.block.feed_forward_chunk(attended)
        # A row whose every attended key sits > ~87 below the row bound (that bound then comes from
        # keys the deletion excludes) underflows float32: run those deletions through the block.
        lost = ~torch.isfinite(merged).all(dim=-1).all(dim=-1)
        if bool(lost.any()):
            block_out = self.block(residual[lost], None)
            out[lost] = block_out[0] if isinstance(block_out, tuple) else block_out
        return out
