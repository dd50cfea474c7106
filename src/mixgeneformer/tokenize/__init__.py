"""Rank-value encoding of cells (SPEC §2) → a Hugging Face ``datasets`` corpus.

For every cell: value_g = count_g / n_counts × 10,000 / median_g over vocabulary genes with a
median; zeros dropped; genes sorted by value, descending (exact float64 order; exact ties broken by
token id, so the result never depends on the order of the matrix columns); truncated to the
maximum length; optionally wrapped in ``<cls>`` … ``<eos>`` (V2 style) with a species token.

The hot path (:func:`rank_value_encode`) is one compiled (numba) pass over a whole CSR chunk: per
cell, a stable LSD radix sort on the float32 bits of the values, then the rare runs of equal
float32 keys are re-ordered by the exact float64 value (ties by token id). No Python loop per cell
or gene. Output is written chunk by chunk as Arrow list arrays built from offsets, never one Python
object per cell.
"""

from __future__ import annotations

from .config import V2_MAX_LEN, TokenizeConfig, load_tokenize_config
from .encode import TokenizeReport, add_special_tokens, rank_value_encode
from .files import run_manifest, tokenize_files
from .inmemory import species_counts, tokenize_anndata, tokenize_for_model, warn_dropped

__all__ = [
    "V2_MAX_LEN",
    "TokenizeConfig",
    "TokenizeReport",
    "add_special_tokens",
    "load_tokenize_config",
    "rank_value_encode",
    "run_manifest",
    "species_counts",
    "tokenize_anndata",
    "tokenize_for_model",
    "tokenize_files",
    "warn_dropped",
]
