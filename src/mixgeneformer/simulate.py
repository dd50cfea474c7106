"""Planted-truth human and mouse count data over real Ensembl IDs (a benchmark fixture).

Two species are simulated over genes of the shipped tables, so gene-ID mapping, vocabularies,
orthologs, medians and tokenization run exactly as on real data:

* **Shared genes**: one-to-one human–mouse ortholog pairs (protein-coding in both species). Each
  pair has one baseline level; mouse multiplies it by a per-gene factor ``exp(N(0, species_shift))``
  (a species-level shift in expression).
* **Species-specific genes**: protein-coding genes of each species with no one-to-one ortholog.
* **Cell types**: each type up-regulates a program of shared genes by ``program_fold`` (a fraction
  ``program_overlap`` of it the same pairs in both species, the rest drawn per species) plus a few
  species-specific genes, and ``n_markers`` planted marker pairs (distinct per type, the same
  pairs in both species) by ``marker_fold``. Types come in sibling pairs (A, B), (C, D), …: the
  cross-species part of B's program repeats a fraction ``sibling_overlap`` of A's, so an A cell
  without its own markers (and own program genes) looks like a B cell — the planted answer of the
  perturbation "which deletions move A toward B".
* **Noise**: per-cell library size ``LogNormal(log(library_size), library_sd)``, counts
  negative-binomial with mean ``library x expression share`` and dispersion ``dispersion``
  (``var = mu + dispersion mu^2``), drawn as a gamma–Poisson mixture.

Everything is a pure function of the :class:`PlantedConfig` (seeded NumPy generator); no file is
written. :func:`simulate_planted` returns both AnnData objects (raw integer counts in CSR ``X``,
``var_names`` = Ensembl IDs, ``obs["cell_type"]``, ``obs["species"]``) and a
:class:`PlantedTruth` (markers, programs and gene sets per type and species).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError
from .genes import gene_table, one_to_one_orthologs, ortholog_table

SPECIES = ("human", "mouse")


@dataclass
class PlantedConfig:
    """Sizes and effect strengths of the simulation (defaults: a CPU benchmark of a few minutes)."""

    n_types: int = 6
    cells_per_type: int = 250  # per species
    n_shared_genes: int = 600  # one-to-one ortholog pairs
    n_specific_genes: int = 150  # per species, no one-to-one ortholog
    program_size: int = 40  # shared genes up-regulated per type
    program_overlap: float = 0.8  # share of a type's shared program identical in both species
    sibling_overlap: float = 0.6  # share of the program a type repeats from its sibling (types 2k, 2k+1)
    specific_program_size: int = 10  # species-specific genes up-regulated per type
    n_markers: int = 5  # planted marker pairs per type
    program_fold: float = 3.0
    marker_fold: float = 10.0
    baseline_sd: float = 1.0  # log-normal spread of baseline levels
    species_shift: float = 0.5  # sd of the per-gene log factor of mouse over human
    library_size: float = 4000.0
    library_sd: float = 0.3
    dispersion: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {
            "n_types": self.n_types, "cells_per_type": self.cells_per_type, "n_shared_genes": self.n_shared_genes,
            "program_size": self.program_size, "n_markers": self.n_markers,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"planted.{name} must be >= 1, got {value}.")
        if self.n_types < 2:
            raise ConfigError(f"planted.n_types must be >= 2 (types are told apart), got {self.n_types}.")
        if self.n_types * self.n_markers + self.program_size > self.n_shared_genes:
            raise ConfigError(
                f"planted.n_shared_genes={self.n_shared_genes} is too small for {self.n_types} types x "
                f"{self.n_markers} markers plus programs of {self.program_size}."
            )
        for name in ("n_specific_genes", "specific_program_size", "baseline_sd", "species_shift", "library_sd"):
            if getattr(self, name) < 0:
                raise ConfigError(f"planted.{name} must be >= 0, got {getattr(self, name)}.")
        if self.specific_program_size > self.n_specific_genes:
            raise ConfigError("planted.specific_program_size cannot exceed planted.n_specific_genes.")
        for name in ("program_overlap", "sibling_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"planted.{name} must be in [0, 1], got {getattr(self, name)}.")
        # A type's sibling draws its own cross-species genes outside the sibling's: the genes left after
        # the markers must hold the sibling's shared program and the part not inherited from it.
        common = int(round(self.program_size * self.program_overlap))
        inherited = min(common, int(round(self.program_size * self.sibling_overlap)))
        needed = self.n_types * self.n_markers + max(self.program_size, 2 * common - inherited)
        if needed > self.n_shared_genes:
            raise ConfigError(
                f"planted.n_shared_genes={self.n_shared_genes} is too small: {self.n_types} types x {self.n_markers} "
                f"markers plus sibling programs ({common} shared genes each, {inherited} in common) need {needed}. "
                "Raise n_shared_genes or sibling_overlap, or lower program_size."
            )
        if min(self.program_fold, self.marker_fold, self.library_size) <= 0 or self.dispersion < 0:
            raise ConfigError("planted folds and library_size must be > 0, dispersion >= 0.")


@dataclass
class PlantedTruth:
    """What was planted. Gene lists are Ensembl IDs of the species named in the key."""

    types: list[str]
    siblings: dict[str, str]  # type -> the type sharing most of its program (pairs A-B, C-D, ...)
    markers: dict[str, dict[str, list[str]]]  # type -> species -> marker IDs (same pairs, same order)
    programs: dict[str, dict[str, list[str]]]  # type -> species -> program IDs (shared + specific, markers excluded)
    shared_pairs: pd.DataFrame  # human_id, mouse_id of every simulated one-to-one pair
    specific_genes: dict[str, list[str]]  # species -> species-specific IDs
    config: dict[str, Any] = field(default_factory=dict)

    def marker_pairs(self, cell_type: str) -> list[tuple[str, str]]:
        return list(zip(self.markers[cell_type]["human"], self.markers[cell_type]["mouse"], strict=True))


@dataclass
class PlantedData:
    human: Any  # AnnData
    mouse: Any  # AnnData
    truth: PlantedTruth

    def __getitem__(self, species: str) -> Any:
        if species not in SPECIES:
            raise KeyError(species)
        return getattr(self, species)


def candidate_genes(rng: np.random.Generator, n_shared: int, n_specific: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Random protein-coding one-to-one pairs and species-specific protein-coding genes of the shipped tables."""
    coding = {s: set(gene_table(s).loc[lambda t: t["biotype"] == "protein_coding", "ensembl_id"]) for s in SPECIES}
    pairs = one_to_one_orthologs()
    pairs = pairs[pairs["human_id"].isin(coding["human"]) & pairs["mouse_id"].isin(coding["mouse"])]
    pairs = pairs.sort_values("human_id").reset_index(drop=True)
    if len(pairs) < n_shared:
        raise ConfigError(f"only {len(pairs)} protein-coding one-to-one pairs are shipped; n_shared_genes={n_shared}.")
    chosen = pairs.iloc[np.sort(rng.choice(len(pairs), size=n_shared, replace=False))].reset_index(drop=True)
    any_ortholog = ortholog_table()
    specific: dict[str, np.ndarray] = {}
    for species, column in (("human", "human_id"), ("mouse", "mouse_id")):
        paired = set(any_ortholog[column]) if column in any_ortholog.columns else set()
        pool = np.array(sorted(coding[species] - paired - set(pairs[column])))
        if pool.size < n_specific:
            raise ConfigError(f"only {pool.size} {species} protein-coding genes without an ortholog; n_specific_genes={n_specific}.")
        specific[species] = np.sort(rng.choice(pool, size=n_specific, replace=False))
    return chosen, specific


def _expression_profiles(config: PlantedConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Per species: ``(n_types, n_genes)`` mean expression shares and the planted gene indices."""
    n_types, n_shared, n_spec = config.n_types, config.n_shared_genes, config.n_specific_genes
    base_shared = rng.lognormal(0.0, config.baseline_sd, size=n_shared)
    shift = np.exp(rng.normal(0.0, config.species_shift, size=n_shared))
    order = rng.permutation(n_shared)
    markers = order[: n_types * config.n_markers].reshape(n_types, config.n_markers)
    rest = order[n_types * config.n_markers :]
    n_common = int(round(config.program_size * config.program_overlap))
    profiles, programs = {}, {}
    n_sibling = min(n_common, int(round(config.program_size * config.sibling_overlap)))
    common = []
    for t in range(n_types):
        if t % 2 == 1:  # repeat part of the sibling's program, draw the rest elsewhere
            inherited = common[t - 1][:n_sibling]
            drawn = rng.choice(np.setdiff1d(rest, common[t - 1]), size=n_common - n_sibling, replace=False)
            common.append(np.concatenate([inherited, drawn]))
        else:
            common.append(rng.choice(rest, size=n_common, replace=False))
    for species in SPECIES:
        base = np.concatenate([base_shared * (shift if species == "mouse" else 1.0),
                               rng.lognormal(0.0, config.baseline_sd, size=n_spec)])
        fold = np.ones((n_types, n_shared + n_spec))
        programs[species] = []
        for t in range(n_types):
            own = rng.choice(np.setdiff1d(rest, common[t]), size=config.program_size - n_common, replace=False)
            specific = n_shared + rng.choice(n_spec, size=config.specific_program_size, replace=False)
            program = np.concatenate([common[t], own, specific])
            fold[t, program] = config.program_fold
            fold[t, markers[t]] = config.marker_fold
            programs[species].append(np.sort(program))
        mean = base[None, :] * fold
        profiles[species] = mean / mean.sum(axis=1, keepdims=True)
    return {"profiles": profiles, "markers": markers, "programs": programs}


def simulate_counts(share: np.ndarray, labels: np.ndarray, config: PlantedConfig, rng: np.random.Generator) -> np.ndarray:
    """Negative-binomial counts ``(n_cells, n_genes)`` int32 around ``library x share[label]``."""
    library = rng.lognormal(np.log(config.library_size), config.library_sd, size=labels.size)
    mu = library[:, None] * share[labels]
    if config.dispersion > 0:
        mu = rng.gamma(shape=1.0 / config.dispersion, scale=mu * config.dispersion)
    return rng.poisson(mu).astype(np.int32)


def simulate_planted(config: PlantedConfig | None = None) -> PlantedData:
    """Simulate human and mouse cells with planted types, programs and markers (module docstring)."""
    config = config or PlantedConfig()
    rng = np.random.default_rng(config.seed)
    pairs, specific = candidate_genes(rng, config.n_shared_genes, config.n_specific_genes)
    planted = _expression_profiles(config, rng)
    types = [f"type_{chr(ord('A') + t)}" if t < 26 else f"type_{t}" for t in range(config.n_types)]
    genes = {s: np.concatenate([pairs[f"{s}_id"].to_numpy(), specific[s]]) for s in SPECIES}
    adatas = {}
    for species in SPECIES:
        labels = np.repeat(np.arange(config.n_types), config.cells_per_type)
        counts = simulate_counts(planted["profiles"][species], labels, config, rng)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([types[t] for t in labels], categories=types), "species": species},
            index=[f"{species}_{i}" for i in range(labels.size)],
        )
        var = pd.DataFrame(index=pd.Index(genes[species], name="ensembl_id"))
        adatas[species] = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    truth = PlantedTruth(
        types=types,
        siblings={types[t]: types[t ^ 1] for t in range(config.n_types) if (t ^ 1) < config.n_types},
        markers={types[t]: {s: list(genes[s][planted["markers"][t]]) for s in SPECIES} for t in range(config.n_types)},
        programs={types[t]: {s: list(genes[s][planted["programs"][s][t]]) for s in SPECIES} for t in range(config.n_types)},
        shared_pairs=pairs[["human_id", "mouse_id"]].copy(),
        specific_genes={s: list(specific[s]) for s in SPECIES},
        config=asdict(config),
    )
    return PlantedData(human=adatas["human"], mouse=adatas["mouse"], truth=truth)


__all__ = ["PlantedConfig", "PlantedData", "PlantedTruth", "candidate_genes", "simulate_counts", "simulate_planted"]
