"""Gene tables, species detection and resolution of gene identifiers to Ensembl IDs.

Internally a gene is its unversioned, upper-case Ensembl ID: ``ENSG…`` (human) or ``ENSMUSG…``
(mouse). Users hand us whatever their files hold — Ensembl IDs with or without versions, or
symbols of either species in any case — and :func:`map_gene_ids` resolves them, reports
coverage, and refuses the silent mismatches that plague other tools (symbols vs IDs, wrong
species, mixed species, low coverage).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import numpy as np
import pandas as pd

from .errors import GeneIdError

logger = logging.getLogger(__name__)

Species = Literal["human", "mouse"]
SPECIES: tuple[Species, ...] = ("human", "mouse")

_ENSEMBL_PATTERN = re.compile(r"^ENS[A-Z]*G\d{6,}", re.IGNORECASE)
_PREFIX_SPECIES = {"ENSG": "human", "ENSMUSG": "mouse"}
_VERSION_SUFFIX = re.compile(r"(\.\d+)?(_PAR_Y)?$", re.IGNORECASE)


@functools.cache
def gene_table(species: Species) -> pd.DataFrame:
    """The shipped gene table of ``species``: columns ``ensembl_id``, ``symbol``, ``biotype``."""
    _check_species(species)
    with resources.files("mixgeneformer.data").joinpath(f"genes_{species}.tsv.gz").open("rb") as handle:
        table = pd.read_csv(handle, sep="\t", compression="gzip", dtype=str, keep_default_na=False)
    return table


@functools.cache
def ortholog_table() -> pd.DataFrame:
    """Human–mouse orthologs: ``human_id``, ``mouse_id``, ``homology_type``, ``confidence``, symbols."""
    with resources.files("mixgeneformer.data").joinpath("orthologs_human_mouse.tsv.gz").open("rb") as handle:
        return pd.read_csv(handle, sep="\t", compression="gzip", dtype={"confidence": "Int64"})


def one_to_one_orthologs() -> pd.DataFrame:
    """The ``one2one`` human–mouse ortholog pairs (columns ``human_id``, ``mouse_id``)."""
    table = ortholog_table()
    return table.loc[table["homology_type"] == "one2one", ["human_id", "mouse_id"]].reset_index(drop=True)


def _check_species(species: str) -> None:
    if species not in SPECIES:
        raise GeneIdError(f"species must be one of {list(SPECIES)}, got {species!r}.")


def strip_versions(ids: np.ndarray) -> np.ndarray:
    """Upper-case Ensembl IDs and remove version suffixes (``ENSG….12`` → ``ENSG…``)."""
    series = pd.Series(np.asarray(ids, dtype=object), dtype=str).str.upper()
    return series.str.replace(_VERSION_SUFFIX, "", regex=True).to_numpy(dtype=object)


def ensembl_species(ids: np.ndarray) -> np.ndarray:
    """Per ID: ``"human"``, ``"mouse"``, ``"other"`` (another Ensembl species) or ``""`` (not Ensembl)."""
    series = pd.Series(np.asarray(ids, dtype=object), dtype=str).str.upper()
    # ENSGR…: GRCh37's IDs of the human PAR genes on chromosome Y (19 of Geneformer's V1 genes)
    prefix = series.str.extract(r"^(ENS[A-Z]*G)R?\d{6,}", expand=False)
    out = prefix.map(_PREFIX_SPECIES).fillna("other").where(prefix.notna(), "")
    return out.to_numpy(dtype=object)


@functools.cache
def _symbol_index(species: Species, case_sensitive: bool) -> pd.Series:
    """symbol → Ensembl ID; among duplicate symbols prefer protein-coding, then the smallest ID."""
    table = gene_table(species)
    table = table[table["symbol"] != ""].copy()
    table["key"] = table["symbol"] if case_sensitive else table["symbol"].str.upper()
    table["rank"] = (table["biotype"] != "protein_coding").astype(int)
    table = table.sort_values(["key", "rank", "ensembl_id"]).drop_duplicates("key")
    return pd.Series(table["ensembl_id"].to_numpy(), index=table["key"].to_numpy())


@functools.cache
def _id_set(species: Species) -> frozenset[str]:
    return frozenset(gene_table(species)["ensembl_id"])


@dataclass
class GeneMapping:
    """Result of resolving a file's gene identifiers to Ensembl IDs.

    Attributes
    ----------
    ensembl_ids
        One entry per input column (same order), ``""`` where the identifier is unknown.
    species
        The species the identifiers belong to.
    id_type
        ``"ensembl"`` or ``"symbol"``: what the input held.
    unmapped
        The input identifiers that could not be resolved (the first 50).
    n_vocabulary_only
        Ensembl IDs kept because the vocabulary holds them although the shipped GENCODE table
        does not (retired or renamed IDs of older annotations, e.g. Geneformer's).
    vocabulary_checked
        Whether a vocabulary's IDs were consulted (``map_gene_ids(vocabulary_ids=...)``).
    n_dots_repaired
        Symbols resolved only after reading ``.`` as ``-`` (R's ``make.names`` writes ``HLA-A`` as
        ``HLA.A`` and ``H2-K1`` as ``H2.K1``).
    """

    ensembl_ids: np.ndarray
    species: Species
    id_type: Literal["ensembl", "symbol"]
    unmapped: list[str] = field(default_factory=list)
    n_vocabulary_only: int = 0
    vocabulary_checked: bool = False
    n_dots_repaired: int = 0

    @property
    def n_input(self) -> int:
        return len(self.ensembl_ids)

    @property
    def n_mapped(self) -> int:
        return int((self.ensembl_ids != "").sum())

    @property
    def fraction_mapped(self) -> float:
        return self.n_mapped / max(self.n_input, 1)

    def coverage_report(self, counts_per_column: np.ndarray | None = None) -> str:
        """One line: genes (and, given per-column totals, counts) mapped, plus unmapped examples."""
        text = f"{self.species} {self.id_type}s: {self.n_mapped:,}/{self.n_input:,} genes mapped ({self.fraction_mapped:.1%})"
        if counts_per_column is not None:
            total = float(np.sum(counts_per_column))
            mapped = float(np.sum(np.asarray(counts_per_column)[self.ensembl_ids != ""]))
            text += f", {mapped / total:.1%} of counts" if total > 0 else ""
        if self.n_dots_repaired:
            example = "H2.K1" if self.species == "mouse" else "HLA.A"  # a mouse file holds no HLA.A
            text += f"; {self.n_dots_repaired:,} of them symbols with '.' for '-' (R's make.names, e.g. {example})"
        if self.n_vocabulary_only:
            text += f"; {self.n_vocabulary_only:,} of them only through the vocabulary (absent from the shipped GENCODE table)"
        n_unmapped = self.n_input - self.n_mapped
        if n_unmapped:
            where = "in neither the shipped gene table nor the vocabulary" if self.vocabulary_checked else "not in the shipped gene table"
            text += f"; {n_unmapped:,} unmapped ({where}"
            text += f", e.g. {', '.join(self.unmapped[:5])})" if self.unmapped else ")"
        return text


#: How much more of a file's symbols (ignoring case) the other species must match before a guess
#: from the symbols' case is refused as ambiguous.
CASE_AMBIGUITY_MARGIN = 0.05
# How a user keeps both species' genes: tokenize / medians have the flag, the model commands read it from YAML.
MIXED_OPTION = ("CLI: --allow-mixed-species; embed, classify, perturb and predict: "
                "allow_mixed_species: true in their --tokenize-config YAML")


def detect_species(ids: Sequence[str], allow_mixed: bool = False) -> Species:
    """Guess the species of gene identifiers (Ensembl prefixes, else symbol tables and case)."""
    ids = np.asarray(ids, dtype=object)
    kinds = ensembl_species(ids)
    is_ensembl = kinds != ""
    if is_ensembl.mean() >= 0.5:
        counts = pd.Series(kinds[is_ensembl]).value_counts()
        if counts.get("other", 0) > 0.5 * is_ensembl.sum():
            example = ids[is_ensembl][kinds[is_ensembl] == "other"][0]
            raise GeneIdError(
                f"gene IDs such as {example!r} are Ensembl IDs of a species other than human (ENSG) or "
                "mouse (ENSMUSG). mixgeneformer supports human and mouse only."
            )
        human, mouse = counts.get("human", 0), counts.get("mouse", 0)
        if min(human, mouse) > 0.05 * (human + mouse) and not allow_mixed:
            raise GeneIdError(
                f"the gene IDs mix species: {human:,} human (ENSG) and {mouse:,} mouse (ENSMUSG). Split the "
                "file by species, or pass allow_mixed=True (" + MIXED_OPTION + ") to keep both."
            )
        return "human" if human >= mouse else "mouse"
    symbols = pd.Series(ids, dtype=str)
    exact = {s: symbols.isin(_symbol_index(s, True).index) for s in SPECIES}
    only_human = int((exact["human"] & ~exact["mouse"]).sum())
    only_mouse = int((exact["mouse"] & ~exact["human"]).sum())
    if max(only_human, only_mouse) == 0:
        upper = symbols.str.upper()
        loose = {s: int(upper.isin(_symbol_index(s, False).index).sum()) for s in SPECIES}
        if max(loose.values()) == 0:
            raise GeneIdError(
                f"none of the gene identifiers (e.g. {', '.join(map(str, ids[:3]))}) is a human or mouse "
                "Ensembl ID or gene symbol. Point gene_column (CLI: --gene-column) at the var column that "
                "holds Ensembl IDs or symbols."
            )
        return "human" if loose["human"] >= loose["mouse"] else "mouse"
    if min(only_human, only_mouse) > 0.2 * max(only_human, only_mouse) and not allow_mixed:
        raise GeneIdError(
            f"the gene symbols look like a mix of species ({only_human:,} only human-style, {only_mouse:,} "
            "only mouse-style): a file should hold one species' genes. Split it by species; or, when its genes are one "
            "species' with a few of the other's, pass species='human' or 'mouse' (CLI: --species) and allow_mixed=True "
            "(" + MIXED_OPTION + ") to leave the other species' symbols unmapped."
        )
    by_case: Species = "human" if only_human >= only_mouse else "mouse"
    _check_case_agrees(symbols, by_case)
    return by_case


def _check_case_agrees(symbols: pd.Series, by_case: Species) -> None:
    """Refuse a guess from the symbols' case when, ignoring case, the other species' symbols match
    clearly more of them: the case was changed (an upper-cased mouse file reads as human)."""
    upper = symbols.str.upper()
    loose = {s: float(upper.isin(_symbol_index(s, False).index).mean()) for s in SPECIES}
    other: Species = "mouse" if by_case == "human" else "human"
    if loose[other] > loose[by_case] + CASE_AMBIGUITY_MARGIN:
        fix = (
            "If they are mouse genes, pass species='mouse' (CLI: --species mouse): case is folded within a species."
            if other == "mouse"
            else "If they are human genes, upper-case them (human symbols are upper case, e.g. "
            "adata.var_names = adata.var_names.str.upper()) or use their Ensembl IDs: title case reads as mouse."
        )
        raise GeneIdError(
            f"the symbols' case says {by_case} (e.g. {', '.join(symbols[:3])}), but ignoring case {loose[other]:.0%} of them "
            f"are {other} symbols and {loose[by_case]:.0%} {by_case} ones: the case looks changed. {fix}"
        )


def map_gene_ids(
    ids: Sequence[str],
    species: Species | Literal["auto"] = "auto",
    allow_mixed: bool = False,
    min_coverage: float = 0.5,
    vocabulary_ids: Collection[str] | None = None,
) -> GeneMapping:
    """Resolve gene identifiers (Ensembl IDs with/without versions, or symbols) to Ensembl IDs.

    Parameters
    ----------
    ids
        One identifier per matrix column (e.g. ``adata.var_names``).
    species
        ``"human"``, ``"mouse"`` or ``"auto"`` (detected from the identifiers).
    allow_mixed
        Accept Ensembl IDs of both species in one file (each keeps its own species). Symbols are
        always resolved in one species.
    min_coverage
        Fraction of identifiers that must resolve; below it a :class:`GeneIdError` suggests the cause.
    vocabulary_ids
        Ensembl IDs of the vocabulary in use (e.g. ``Vocabulary.gene_to_id``): an ID listed there
        maps to itself even when the shipped GENCODE table lacks it (Geneformer's V1 vocabulary
        holds 3,395 such IDs). Counted in :attr:`GeneMapping.n_vocabulary_only`.

    Returns
    -------
    GeneMapping
        Ensembl IDs aligned with ``ids`` (``""`` where unknown) and coverage information.
    """
    ids = np.asarray(ids, dtype=object)
    if ids.ndim != 1 or len(ids) == 0:
        raise GeneIdError("no gene identifiers given: the matrix has no columns (var is empty).")
    if species != "auto":
        _check_species(species)
    kinds = ensembl_species(ids)
    ensembl_fraction = float((kinds != "").mean())
    if 0.05 < ensembl_fraction < 0.95:
        raise GeneIdError(
            f"the gene identifiers mix Ensembl IDs ({ensembl_fraction:.0%}) and other names (e.g. "
            f"{ids[kinds == ''][0]!r}). Choose one kind with gene_column (CLI: --gene-column NAME of a var column)."
        )
    is_ensembl = ensembl_fraction >= 0.95
    if species == "auto" or is_ensembl:  # Ensembl IDs are always checked for mixed species
        detected = detect_species(ids, allow_mixed=allow_mixed)
        species = detected if species == "auto" else species
    extra = frozenset() if vocabulary_ids is None else frozenset(str(g).upper() for g in vocabulary_ids)
    if is_ensembl:
        mapping = _map_ensembl(ids, kinds, species, allow_mixed, extra)
    else:
        mapping = _map_symbols(ids, species, extra, allow_mixed)
    mapping.vocabulary_checked = vocabulary_ids is not None
    _check_coverage(mapping, min_coverage)
    return mapping


def _vocabulary_only(stripped: pd.Series, kinds: np.ndarray, species: Species, allow_mixed: bool, extra: frozenset[str]) -> np.ndarray:
    """IDs the vocabulary holds but the shipped tables lack (never one of the other species, unless mixed)."""
    if not extra:
        return np.zeros(len(stripped), dtype=bool)
    in_vocab = stripped.isin(extra).to_numpy()
    foreign = np.zeros(len(stripped), dtype=bool) if allow_mixed else (kinds != species) & (kinds != "")
    return in_vocab & ~foreign & ~stripped.isin(_id_set("human") | _id_set("mouse")).to_numpy()


def _map_ensembl(
    ids: np.ndarray, kinds: np.ndarray, species: Species, allow_mixed: bool, extra: frozenset[str] = frozenset()
) -> GeneMapping:
    wrong = (kinds != species) & (kinds != "")
    if wrong.any() and not allow_mixed:
        other = pd.Series(kinds[wrong]).value_counts().index[0]
        if wrong.mean() > 0.5:
            raise GeneIdError(
                f"species={species!r} but {wrong.sum():,} of {len(ids):,} gene IDs are {other} "
                f"(e.g. {ids[wrong][0]!r}). Pass species='{other}' (CLI: --species {other}) or 'auto'."
            )
        logger.warning(
            "%s of %s gene IDs are not %s Ensembl IDs (e.g. %r, %s) and are left unmapped; split the file by "
            "species, or pass allow_mixed=True (" + MIXED_OPTION + ") to keep human and mouse genes.",
            f"{wrong.sum():,}", f"{len(ids):,}", species, ids[wrong][0], other,
        )
    stripped = strip_versions(ids)
    known = _id_set("human") | _id_set("mouse") if allow_mixed else _id_set(species)
    keep = pd.Series(stripped).isin(known).to_numpy()
    if not allow_mixed:
        keep &= kinds == species
    vocabulary_only = _vocabulary_only(pd.Series(stripped), kinds, species, allow_mixed, extra)
    keep |= vocabulary_only
    ensembl = np.where(keep, stripped, "").astype(object)
    return GeneMapping(ensembl, species, "ensembl", [str(x) for x in ids[~keep][:50]], int(vocabulary_only.sum()))


#: Above this fraction of a file's symbols being exact symbols of the other species only, the file
#: is refused as mixed (below it, those columns are left unmapped with a warning).
MIXED_SYMBOL_FRACTION = 0.05


def _map_symbols(ids: np.ndarray, species: Species, extra: frozenset[str] = frozenset(), allow_mixed: bool = False) -> GeneMapping:
    symbols = pd.Series(ids, dtype=str)
    exact = symbols.map(_symbol_index(species, True))
    # Case-folding never crosses species: a symbol spelled exactly as the other species writes it
    # (mouse "Gcg" in a human file) is not folded onto this species' gene (human "GCG"). Human
    # symbols are upper-case, so a human spelling in a mouse file counts only where the file keeps
    # mouse case conventions (most symbols mixed-case); an upper-cased mouse file folds as before.
    other = "mouse" if species == "human" else "human"
    foreign = exact.isna() & symbols.isin(_symbol_index(other, True).index)
    has_lower = symbols.str.contains("[a-z]", regex=True)
    loose = symbols.str.upper().map(_symbol_index(species, False))
    if species == "human":
        foreign &= has_lower
    elif (has_lower & symbols.str.contains("[A-Z]", regex=True)).mean() <= 0.5:
        # upper-cased symbols: a mouse file written in upper case folds, unless more of them are exact human
        # symbols than fold onto mouse genes at all (a human file given as mouse)
        if symbols.isin(_symbol_index(other, True).index).sum() <= loose.notna().sum():
            foreign &= False
    _check_foreign_symbols(ids, species, other, int(exact.notna().sum()), foreign.to_numpy(), (foreign & loose.notna()).to_numpy(), allow_mixed)
    resolved = exact.where(exact.notna(), loose.where(~foreign))
    resolved, n_repaired = _repair_dots(symbols, resolved, species)
    resolved = resolved.where(resolved.notna(), "")  # not fillna: it warns when it would downcast an all-missing column
    # A column may also hold a bare Ensembl ID among symbols (10x does this for unnamed genes).
    stripped = pd.Series(strip_versions(ids))
    vocabulary_only = _vocabulary_only(stripped, ensembl_species(ids), species, False, extra)
    is_id = stripped.isin(_id_set(species)).to_numpy() | vocabulary_only
    resolved = resolved.where(~is_id, stripped).to_numpy(dtype=object)
    unmapped = [str(x) for x in ids[resolved == ""][:50]]
    return GeneMapping(resolved, species, "symbol", unmapped, int(vocabulary_only.sum()), n_dots_repaired=n_repaired)


def _repair_dots(symbols: pd.Series, resolved: pd.Series, species: Species) -> tuple[pd.Series, int]:
    """Resolve unknown symbols with a '.' as the same symbol with '-' (R's make.names turned '-' into
    '.'), where the file does not also hold that '-' spelling; returns the mapping and how many."""
    dashed = symbols.str.replace(".", "-", regex=False)
    candidate = resolved.isna() & symbols.str.contains(".", regex=False) & ~dashed.isin(set(symbols))
    if not candidate.any():
        return resolved, 0
    repaired = dashed[candidate].map(_symbol_index(species, True))
    repaired = repaired.where(repaired.notna(), dashed[candidate].str.upper().map(_symbol_index(species, False)))
    resolved = resolved.copy()
    resolved[candidate] = repaired
    return resolved, int(repaired.notna().sum())


def _check_foreign_symbols(
    ids: np.ndarray, species: Species, other: Species, n_exact: int, foreign: np.ndarray, unfolded: np.ndarray,
    allow_mixed: bool,
) -> None:
    """Refuse symbols of the other species (wrong ``species``, or a mixed file); warn about a few.

    ``foreign``: spelled exactly as the other species' symbols (and not as this species'); among
    them ``unfolded``: those that case-folding would have merged into a gene of this species.
    """
    n_foreign = int(foreign.sum())
    if n_foreign == 0:
        return
    examples = ", ".join(map(str, ids[foreign][:5]))
    if n_foreign > n_exact:
        raise GeneIdError(
            f"species={species!r} but {n_foreign:,} of {len(ids):,} gene symbols are spelled as {other} symbols "
            f"(e.g. {examples}) and only {n_exact:,} as {species} ones. Pass species='{other}' (CLI: --species "
            f"{other}) or 'auto'; symbols are never case-folded across species."
        )
    if n_foreign > MIXED_SYMBOL_FRACTION * len(ids) and not allow_mixed:
        raise GeneIdError(
            f"{n_foreign:,} of {len(ids):,} gene symbols ({n_foreign / len(ids):.1%}) of this {species} file are spelled "
            f"as {other} symbols (e.g. {examples}): the file mixes species. Split it by species, or pass "
            "allow_mixed=True (" + MIXED_OPTION + ") to leave those columns unmapped."
        )
    if unfolded.any():
        logger.warning(
            "%s gene symbols: %d of %d columns are spelled as %s symbols (e.g. %s) and are left unmapped, not folded "
            "onto %s genes; if they are %s genes, split the file by species",
            species, int(unfolded.sum()), len(ids), other, ", ".join(map(str, ids[unfolded][:5])), species, other,
        )


def _check_coverage(mapping: GeneMapping, min_coverage: float) -> None:
    logger.info("gene mapping: %s", mapping.coverage_report())
    if mapping.fraction_mapped < min_coverage:
        hint = (
            "Are these symbols of the other species, or IDs from another annotation? Check species= (CLI: --species)"
            if mapping.id_type == "symbol"
            else "Wrong species? Check species= (CLI: --species)"
        )
        raise GeneIdError(
            f"only {mapping.fraction_mapped:.1%} of gene identifiers could be resolved ({mapping.coverage_report()}), "
            f"below min_coverage={min_coverage:.0%}. {hint}, or point gene_column (CLI: --gene-column) at the var "
            "column holding Ensembl IDs or symbols. Lower min_coverage only if the file really has few known genes."
        )


def symbols_of(ensembl_ids: Sequence[str]) -> np.ndarray:
    """Gene symbols for Ensembl IDs of either species (``""`` where unknown)."""
    table = pd.concat([gene_table("human"), gene_table("mouse")])
    lookup = pd.Series(table["symbol"].to_numpy(), index=table["ensembl_id"].to_numpy())
    return pd.Series(np.asarray(ensembl_ids, dtype=object)).map(lookup).fillna("").to_numpy(dtype=object)
