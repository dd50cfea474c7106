"""Numba kernels compiled once and cached on disk, or compiled every run where no cache can be written."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numba

Kernel = TypeVar("Kernel", bound=Callable[..., object])


def njit(function: Kernel) -> Kernel:
    """``numba.njit(cache=True, nogil=True)``; without caching when numba finds no writable cache
    folder (a read-only install and HOME), where ``cache=True`` raises at import."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:
        return numba.njit(cache=False, nogil=True)(function)
