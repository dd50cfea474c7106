"""Training-order samplers: length-grouped mega-batches and species balance, seeded per epoch.

The order of an epoch depends only on ``(seed, epoch)``, never on the global RNG, so a resumed run
replays exactly the order of a straight run, and every rank of a distributed job computes the same
order (Accelerate then hands each rank its own slice of batches). All work is vectorized: an epoch
of 50M cells is a handful of NumPy calls.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from .errors import ConfigError
from .seeds import content_seed

# Geneformer groups 50 batches into one "mega-batch" before sorting it by length.
MEGA_BATCH_MULT = 50


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The NumPy generator of one epoch: a pure function of ``(seed, epoch)``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x6D6978]))


def length_grouped_order(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, mega_batch_mult: int = MEGA_BATCH_MULT
) -> np.ndarray:
    """Shuffle, cut into mega-batches, sort each mega-batch by length (longest first).

    Parameters
    ----------
    lengths
        Sequence length of each example, in the order the examples will be indexed.
    batch_size
        Examples per (global) batch; a mega-batch holds ``mega_batch_mult * batch_size`` examples.
    rng
        Source of the shuffle.
    mega_batch_mult
        Batches per mega-batch.

    Returns
    -------
    numpy.ndarray
        A permutation of ``range(len(lengths))`` (int64). Consecutive batches hold cells of similar
        length, so padding is small; the mega-batch with the longest cell comes first, so an
        out-of-memory error shows at step one rather than hours in.
    """
    lengths = np.asarray(lengths)
    n = lengths.shape[0]
    perm = rng.permutation(n)
    mega = max(1, int(mega_batch_mult) * int(batch_size))
    group = np.arange(n) // mega
    # lexsort: last key is primary -> by mega-batch, then by descending length within it.
    order = perm[np.lexsort((-lengths[perm], group))]
    if n:
        # Like Hugging Face: the longest cell swaps places with the first one.
        longest = int(np.argmax(lengths[order]))
        order[[0, longest]] = order[[longest, 0]]
    return order.astype(np.int64, copy=False)


def species_balanced_draw(species_codes: np.ndarray, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n_draws`` example indices (with replacement) so every species is equally likely.

    Within a species, examples are drawn uniformly. Species absent from ``species_codes`` are
    ignored. Returns an int64 index array.
    """
    codes = np.asarray(species_codes).ravel()
    # Any code values (negative ones too): each example's weight comes from its code's position among
    # the codes present, never from the code used as an index.
    present, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    if present.size == 0:
        raise ConfigError("species-balanced sampling needs a non-empty corpus.")
    probabilities = (1.0 / (counts * present.size))[inverse]
    cumulative = np.cumsum(probabilities)
    cumulative /= cumulative[-1]
    draws = np.searchsorted(cumulative, rng.random(n_draws), side="right")
    return np.minimum(draws, codes.size - 1).astype(np.int64)


class PretrainSampler(Sampler[int]):
    """Per-epoch deterministic order: shuffled, optionally species-balanced and length-grouped.

    Parameters
    ----------
    n_examples
        Size of the training set.
    batch_size
        Global batch size (per-device batch x ranks x gradient accumulation) used for grouping.
    seed
        Base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
    lengths
        Per-example lengths; required when ``group_by_length``.
    species_codes
        Per-example integer species codes; required when ``species_balanced``.
    group_by_length
        Sort mega-batches by length (Geneformer's length-grouped batches).
    species_balanced
        Draw examples so each species makes up an equal share of an epoch (with replacement).
    mega_batch_mult
        Batches per mega-batch.
    """

    def __init__(
        self,
        n_examples: int,
        batch_size: int,
        seed: int,
        lengths: np.ndarray | None = None,
        species_codes: np.ndarray | None = None,
        group_by_length: bool = True,
        species_balanced: bool = False,
        mega_batch_mult: int = MEGA_BATCH_MULT,
    ) -> None:
        if group_by_length and (lengths is None or len(lengths) != n_examples):
            raise ConfigError("group_by_length needs the corpus column 'length' (one value per cell).")
        if species_balanced and (species_codes is None or len(species_codes) != n_examples):
            raise ConfigError("species_balanced sampling needs the corpus column 'species'.")
        self.n_examples = int(n_examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.species_codes = None if species_codes is None else np.asarray(species_codes)
        self.group_by_length = group_by_length
        self.species_balanced = species_balanced
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (called by the Trainer/Accelerate)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_examples

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The full index order of ``epoch`` (default: the current one)."""
        rng = epoch_generator(self.seed, self.epoch if epoch is None else epoch)
        if self.species_balanced:
            assert self.species_codes is not None
            indices = species_balanced_draw(self.species_codes, self.n_examples, rng)
        else:
            indices = np.arange(self.n_examples, dtype=np.int64)
        if self.group_by_length:
            assert self.lengths is not None
            return indices[length_grouped_order(self.lengths[indices], self.batch_size, rng, self.mega_batch_mult)]
        return indices[rng.permutation(indices.size)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order().tolist())


def batch_seed(seed: int, epoch: int, input_ids: list[np.ndarray] | list[list[int]]) -> int:
    """A seed for one batch's random masking, from the run seed, the epoch and the batch content.

    Masking then does not depend on the global RNG, so a resumed run (which skips batches without
    collating them) masks every later batch exactly as a straight run does.
    """

    return content_seed(seed, epoch, input_ids) & 0x7FFF_FFFF_FFFF_FFFF  # 63 bits: a torch manual_seed
