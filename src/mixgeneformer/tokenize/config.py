"""Options of rank-value tokenization (saved as config.yaml beside every corpus)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..config import from_dict
from ..errors import ConfigError
from ..readers import (
    ReadOptions,
)

V2_MAX_LEN = 4096


@dataclass
class TokenizeConfig:
    """Options of rank-value tokenization (saved as ``config.yaml`` beside every corpus).

    Attributes
    ----------
    max_len
        Maximum sequence length including special tokens (V1 default 2048; V2 at most 4096).
    style
        ``"v1"``: gene tokens only (Geneformer V1). ``"v2"``: ``<cls>`` genes … ``<eos>``.
    add_species_token
        Put the species token (``<human>`` / ``<mouse>``) first (after ``<cls>`` in V2).
    totals
        ``"all"``: n_counts over all genes (obs ``n_counts`` if present; Geneformer). ``"kept"``:
        over vocabulary genes only (the authors' variant).
    medians
        ``"corpus"``: the given median table. ``"per_file"``: medians computed on each input.
    duplicate_genes
        Columns that map to the same gene: ``"sum"`` their counts (Geneformer) or ``"error"``.
    min_coverage
        Minimum fraction of an input's gene identifiers that must resolve to Ensembl IDs (an error
        below it); a warning too when less than this fraction of its counts falls on vocabulary
        genes with a median. With medians='corpus', the median table and the vocabulary must share
        this fraction (at most 0.5) of the table's genes or of the vocabulary's, else the table was
        built for another vocabulary (:meth:`GeneMedians.check_vocabulary`).
    chunk_size
        Cells per chunk (bounds memory: about 50 bytes per stored nonzero).
    task_cells
        Cells per worker task (a file is split into ranges of this size; resume granularity).
    species
        ``"auto"`` (detected per input), ``"human"`` or ``"mouse"``.
    allow_mixed_species
        Accept human and mouse Ensembl IDs within one input.
    allow_fractional
        Accept non-integer counts.
    layer, gene_column, measurement
        Where counts and gene identifiers are read (see :func:`readers.open_source`).
    filter_pass
        Honour an obs ``filter_pass`` column (keep cells with 1).
    obs_filter
        TileDB-SOMA inputs only: tokenize just the cells this tiledbsoma ``value_filter`` over obs
        selects (e.g. ``"tissue_general == 'pancreas' and is_primary_data == True"``); any other input
        is refused. ``cell_index`` then counts the selected cells in soma_joinid order. A model
        bundle's recorded filter is not applied to new cells (:func:`bundle.bundle_tokenize_config`).
    """

    max_len: int = 2048
    style: Literal["v1", "v2"] = "v1"
    add_species_token: bool = False
    totals: Literal["all", "kept"] = "all"
    medians: Literal["corpus", "per_file"] = "corpus"
    duplicate_genes: Literal["sum", "error"] = "sum"
    min_coverage: float = 0.5
    chunk_size: int = 4096
    task_cells: int = 50_000
    species: Literal["auto", "human", "mouse"] = "auto"
    allow_mixed_species: bool = False
    allow_fractional: bool = False
    layer: str | None = None
    gene_column: str | None = None
    measurement: str = "RNA"
    filter_pass: bool = True
    obs_filter: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("style", ("v1", "v2")),
            ("totals", ("all", "kept")),
            ("medians", ("corpus", "per_file")),
            ("duplicate_genes", ("sum", "error")),
            ("species", ("auto", "human", "mouse")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"tokenize.{name}={getattr(self, name)!r} is not one of {list(allowed)}.")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ConfigError(f"tokenize.min_coverage={self.min_coverage} is a fraction of gene IDs: give a value from 0 to 1.")
        if self.style == "v2" and self.max_len > V2_MAX_LEN:
            raise ConfigError(f"tokenize.max_len={self.max_len} exceeds {V2_MAX_LEN}, the V2 maximum (special tokens included).")
        if self.max_len <= self.n_special:
            raise ConfigError(f"tokenize.max_len={self.max_len} leaves no room for genes after {self.n_special} special tokens.")
        if self.chunk_size < 1 or self.task_cells < 1:
            raise ConfigError(f"tokenize.chunk_size ({self.chunk_size}) and task_cells ({self.task_cells}) must be ≥ 1.")

    @property
    def read_options(self) -> ReadOptions:
        """The reader options of this config (the medians stage reads inputs with the same ones)."""
        return ReadOptions(
            layer=self.layer, gene_column=self.gene_column, species=self.species, min_coverage=self.min_coverage,
            allow_mixed_species=self.allow_mixed_species, allow_fractional=self.allow_fractional,
            measurement=self.measurement, totals=self.totals, chunk_size=self.chunk_size, obs_filter=self.obs_filter,
        )

    @property
    def n_special(self) -> int:
        """Special tokens per sequence (``<cls>``, ``<eos>``, species)."""
        return (2 if self.style == "v2" else 0) + (1 if self.add_species_token else 0)

    @property
    def max_genes(self) -> int:
        """Gene tokens kept per cell."""
        return self.max_len - self.n_special


def load_tokenize_config(data: dict[str, Any] | None) -> TokenizeConfig:
    """Strictly validated :class:`TokenizeConfig` from a mapping (unknown keys / wrong types rejected)."""
    return from_dict(TokenizeConfig, data, "tokenize")
