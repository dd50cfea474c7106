"""Batches for pretraining: dynamic padding and BERT-style masking of gene tokens.

Randomness comes from torch's global RNG (no private generator), so the seeding that the Hugging
Face Trainer / Accelerate apply — and restore on resume — makes the masks reproducible. Sampling
order (length-grouped, species-balanced) lives in :mod:`mixgeneformer.sampling`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ConfigError, InputDataError
from .inference import pad_batch
from .seeds import content_seed

if TYPE_CHECKING:
    from .vocab import Vocabulary

IGNORE_INDEX = -100
SPECIES_CODES: dict[str, int] = {"human": 0, "mouse": 1}
EVAL_MASK_EPOCH = -1  # the epoch in the masking seed of held-out cells: never a training epoch


def pad_sequences(
    sequences: Sequence[Sequence[int] | np.ndarray | torch.Tensor],
    pad_id: int,
    pad_to_multiple_of: int | None = 8,
    max_len: int | None = None,
    eos_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences into ``(B, L)`` int64 ``input_ids`` and ``attention_mask``.

    Parameters
    ----------
    sequences
        Token id sequences (lists, NumPy arrays or tensors), each non-empty.
    pad_id
        Id written after the end of each sequence.
    pad_to_multiple_of
        Round ``L`` up to a multiple of this (tensor-core friendly); never beyond ``max_len``.
    max_len
        Keep at most the first ``max_len`` tokens (the highest-ranked genes). If a truncated
        sequence ended with ``eos_id``, its last kept position becomes ``eos_id`` again.
    eos_id
        The end token of V2-style cells, or None.

    Returns
    -------
    (input_ids, attention_mask)
        Both ``(B, L)`` int64.
    """
    if len(sequences) == 0:
        raise InputDataError("cannot collate an empty batch (0 cells).")
    arrays = [np.asarray(s.cpu() if isinstance(s, torch.Tensor) else s, dtype=np.int64).reshape(-1) for s in sequences]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    if (lengths == 0).any():
        raise InputDataError(
            f"cell {int(np.flatnonzero(lengths == 0)[0])} of the batch has no tokens; the corpus must not hold "
            "zero-length cells (re-tokenize it: cells without vocabulary genes are dropped there)."
        )
    flat = np.concatenate(arrays)
    starts = np.cumsum(lengths) - lengths
    kept_lengths = lengths if max_len is None else np.minimum(lengths, max_len)
    width = int(kept_lengths.max())
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        if max_len is not None:
            width = min(width, max_len)
    input_ids, attention_mask = pad_batch(flat, starts, kept_lengths, pad_id, width)
    if eos_id is not None and max_len is not None:
        ends_with_eos = flat[starts + lengths - 1] == eos_id
        truncated = ends_with_eos & (lengths > max_len)
        if truncated.any():  # then width == max_len
            input_ids[np.flatnonzero(truncated), max_len - 1] = eos_id
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_lookup: torch.Tensor,
    gene_ids: torch.Tensor,
    mask_id: int,
    mlm_probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of gene tokens (vectorized, torch global RNG).

    Each attended non-special token is selected with probability ``mlm_probability``; of the
    selected, ``mask_fraction`` become ``mask_id``, ``random_fraction`` become a uniformly drawn
    *gene* token (never a special token) and the rest stay unchanged.

    Parameters
    ----------
    input_ids, attention_mask
        ``(B, L)`` int64 tensors (not modified).
    special_lookup
        Bool tensor over the vocabulary: True for special tokens (never selected).
    gene_ids
        1-D int64 tensor of the gene token ids random replacements are drawn from.
    mask_id
        Id of ``<mask>``.
    mlm_probability, mask_fraction, random_fraction
        BERT's 0.15 / 0.8 / 0.1.

    Returns
    -------
    (masked_input_ids, labels)
        ``labels`` holds the original token at selected positions and -100 elsewhere.
    """
    candidates = attention_mask.bool() & ~special_lookup[input_ids]
    selected = torch.bernoulli(torch.full(input_ids.shape, mlm_probability)).bool() & candidates
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    to_mask = torch.bernoulli(torch.full(input_ids.shape, mask_fraction)).bool() & selected
    random_share = random_fraction / (1.0 - mask_fraction) if mask_fraction < 1.0 else 0.0
    to_random = torch.bernoulli(torch.full(input_ids.shape, min(random_share, 1.0))).bool() & selected & ~to_mask
    masked = input_ids.masked_fill(to_mask, mask_id)
    n_random = int(to_random.sum())
    if n_random:
        masked[to_random] = gene_ids[torch.randint(len(gene_ids), (n_random,))]
    return masked, labels


class PretrainingCollator:
    """Turn corpus rows into an MLM batch: pad, mask, label, and carry the species.

    Parameters
    ----------
    vocab
        The corpus vocabulary (its special tokens are never masked or sampled).
    mlm_probability
        Fraction of gene tokens selected for prediction (0.15).
    pad_to_multiple_of
        Round the padded length up to a multiple of this (8; None to switch off).
    max_len
        Truncate cells to their first ``max_len`` tokens (e.g. the model's
        ``max_position_embeddings``); None keeps them whole.
    mask_fraction, random_fraction
        Of the selected tokens, the share replaced by ``<mask>`` (0.8) and by a random gene (0.1).

    Call it with a list of rows (mappings with ``input_ids`` and optionally ``species``, as
    ``"human"``/``"mouse"`` or 0/1). Returns ``input_ids``, ``attention_mask``, ``labels`` (all
    ``(B, L)`` int64) and, when the rows have it, ``species`` ``(B,)`` int64 (0 human, 1 mouse).
    """

    def __init__(
        self,
        vocab: Vocabulary,
        mlm_probability: float = 0.15,
        pad_to_multiple_of: int | None = 8,
        max_len: int | None = None,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ):
        if not 0.0 < mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability={mlm_probability} must be in (0, 1); BERT uses 0.15.")
        if not (0.0 <= mask_fraction and 0.0 <= random_fraction and mask_fraction + random_fraction <= 1.0):
            raise ConfigError(
                f"mask_fraction={mask_fraction} and random_fraction={random_fraction} must be >= 0 and sum to <= 1 "
                "(BERT: 0.8 and 0.1)."
            )
        if max_len is not None and max_len < 1:
            raise ConfigError(f"max_len={max_len} must be a positive number of tokens (or None).")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1 (or None).")
        self.vocab_size = len(vocab)
        self.pad_id = int(vocab.pad_id)
        self.mask_id = int(vocab.mask_id)
        self.eos_id = None if vocab.eos_id is None else int(vocab.eos_id)
        special = np.zeros(self.vocab_size, dtype=bool)
        special[np.asarray(vocab.special_ids, dtype=np.int64)] = True
        self.special_lookup = torch.from_numpy(special)
        self.gene_ids = torch.from_numpy(np.flatnonzero(~special).astype(np.int64))
        if len(self.gene_ids) == 0:
            raise ConfigError("the vocabulary has no gene tokens; build it with `mixgf vocab build`.")
        self.mlm_probability = mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_len = max_len
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction

    def _pad(self, rows: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' ``input_ids`` padded and cut (:func:`pad_sequences`) and checked against the vocabulary."""
        try:
            sequences = [row["input_ids"] for row in rows]
        except (KeyError, TypeError) as exc:
            raise InputDataError("each corpus row must be a mapping with an 'input_ids' list (a tokenized corpus).") from exc
        input_ids, attention_mask = pad_sequences(
            sequences, self.pad_id, self.pad_to_multiple_of, self.max_len, self.eos_id
        )
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size:
            bad_row = int(torch.nonzero((input_ids < 0) | (input_ids >= self.vocab_size))[0, 0])
            raise InputDataError(
                f"cell {bad_row} of the batch has token ids outside 0..{self.vocab_size - 1}; the corpus was tokenized "
                "with a different vocabulary. Re-tokenize it with the model's vocabulary."
            )
        return input_ids, attention_mask

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self._pad(rows)
        masked, labels = mask_tokens(
            input_ids,
            attention_mask,
            self.special_lookup,
            self.gene_ids,
            self.mask_id,
            self.mlm_probability,
            self.mask_fraction,
            self.random_fraction,
        )
        batch = {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}
        species = species_codes(rows)
        if species is not None:
            batch["species"] = species
        return batch


class HeldOutMaskingCollator:
    """Masking of held-out cells that depends on each cell alone: position ``j`` of a cell is selected
    when a uniform draw seeded by (``seed``, the cell's tokens) falls below ``mlm_probability``, and every
    selected position becomes ``<mask>`` (no random or unchanged tokens whose identity the model could copy).

    A held-out cell is thus scored on the same positions at every evaluation and in every run of the
    same corpus and seed, whatever batch it shares (batch size, number of processes, order); seeding
    per batch (:class:`mixgeneformer.trainer.SeededMaskingCollator`) masked it differently under 2
    processes than under 1.
    """

    def __init__(self, inner: PretrainingCollator, seed: int) -> None:
        self.inner = inner
        self.seed = int(seed)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        inner = self.inner
        input_ids, attention_mask = inner._pad(rows)
        draws = np.ones(tuple(input_ids.shape))
        for i, row in enumerate(rows):  # one seed per cell: (seed, the cell's tokens)
            cell = np.asarray(row["input_ids"], dtype=np.int32).reshape(-1)
            kept = min(cell.size, draws.shape[1])
            draws[i, :kept] = np.random.default_rng(content_seed(self.seed, EVAL_MASK_EPOCH, [cell])).random(cell.size)[:kept]
        selected = torch.from_numpy(draws < inner.mlm_probability) & attention_mask.bool() & ~inner.special_lookup[input_ids]
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        batch = {"input_ids": input_ids.masked_fill(selected, inner.mask_id), "attention_mask": attention_mask, "labels": labels}
        species = species_codes(rows)
        if species is not None:
            batch["species"] = species
        return batch


def species_codes(rows: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    """``(B,)`` int64 species codes (0 human, 1 mouse) of the rows, or None if no row has one."""
    has = [("species" in row) for row in rows]
    if not any(has):
        return None
    if not all(has):
        raise InputDataError("some corpus rows have a 'species' value and some do not; re-tokenize the corpus.")
    codes = []
    for row in rows:
        value = row["species"]
        if isinstance(value, str):
            if value not in SPECIES_CODES:
                raise InputDataError(f"species {value!r} in the corpus is not one of {sorted(SPECIES_CODES)}.")
            codes.append(SPECIES_CODES[value])
        else:
            code = int(value)
            if code not in SPECIES_CODES.values():
                raise InputDataError(f"species code {code} in the corpus is not 0 (human) or 1 (mouse).")
            codes.append(code)
    return torch.tensor(codes, dtype=torch.long)
