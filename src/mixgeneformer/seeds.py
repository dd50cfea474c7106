"""Seeds drawn from content: the run seed, an epoch and cells' tokens, hashed (blake2b), so that random
masking depends on what is masked, never on the global RNG, the batch order or the process."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def content_seed(seed: int, epoch: int, cells: Sequence[np.ndarray] | Sequence[Sequence[int]]) -> int:
    """A 64-bit seed from (``seed``, ``epoch``, each cell's length and int32 tokens, in order)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray([seed, epoch], dtype=np.int64).tobytes())
    for ids in cells:
        arr = np.asarray(ids, dtype=np.int32).reshape(-1)
        digest.update(np.int64(arr.size).tobytes())
        digest.update(arr.tobytes())
    return int.from_bytes(digest.digest(), "little")
