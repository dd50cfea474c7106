"""The unified human + mouse gene vocabulary.

Token ids of vocabularies we build: ``<pad>`` 0, ``<mask>`` 1, ``<cls>`` 2, ``<eos>`` 3,
``<human>`` 4, ``<mouse>`` 5, then genes. Two modes:

``separate`` (default, the paper's model)
    every human ``ENSG…`` and every mouse ``ENSMUSG…`` gene is its own token;
``ortholog``
    each one-to-one human–mouse ortholog pair shares one token (named ``ENSG…|ENSMUSG…``), so a
    model transfers across species by construction; all other genes keep their own token.

A vocabulary imported from Geneformer's published dictionaries keeps Geneformer's ids exactly
(mode ``geneformer``: ``<pad>`` 0, ``<mask>`` 1, human genes from 2, no ``<cls>``/``<eos>``).
Vocabularies are stored as JSON with a content hash that corpora and models record; never pickle.
"""

from __future__ import annotations

import functools
import json
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import pandas as pd

from .errors import ArtifactError, ConfigError, GeneIdError
from .fileio import content_hash, read_json, write_json
from .genes import (
    SPECIES,
    Species,
    ensembl_species,
    gene_table,
    one_to_one_orthologs,
    strip_versions,
)
from .pickles import load_restricted_pickle

if TYPE_CHECKING:
    from .medians import GeneMedians

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<mask>", "<cls>", "<eos>")
SPECIES_TOKENS: dict[str, str] = {"human": "<human>", "mouse": "<mouse>"}
VocabMode = Literal["separate", "ortholog", "geneformer"]
GeneSet = Literal["protein_coding", "all", "medians"]
_FORMAT = "mixgeneformer-vocabulary"

# Codes of Vocabulary.token_species().
SPECIAL, HUMAN, MOUSE, SHARED = -1, 0, 1, 2


class Vocabulary:
    """An ordered token list plus the map from Ensembl gene IDs (either species) to token ids.

    Parameters
    ----------
    tokens
        Token names by id. Special tokens are the names in angle brackets.
    gene_to_id
        Unversioned Ensembl ID → token id (two genes share an id in ``ortholog`` mode).
    mode
        ``"separate"``, ``"ortholog"`` or ``"geneformer"``.
    """

    def __init__(self, tokens: Sequence[str], gene_to_id: dict[str, int], mode: VocabMode = "separate"):
        self.tokens = list(tokens)
        self.gene_to_id = {str(k): int(v) for k, v in gene_to_id.items()}
        self.mode = mode
        #: the file this vocabulary was loaded from (``None`` when built in memory); named in errors
        self.path: Path | None = None
        self._index = {token: i for i, token in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ArtifactError("vocabulary has duplicate token names; it is corrupt. Rebuild it with `mixgf vocab build`.")
        for name in ("<pad>", "<mask>"):
            if name not in self._index:
                raise ArtifactError(f"vocabulary lacks the required special token {name}.")
        if self.gene_to_id and max(self.gene_to_id.values()) >= len(self.tokens):
            raise ArtifactError("vocabulary maps a gene to a token id beyond its token list; it is corrupt.")

    # -- special tokens -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Vocabulary(mode={self.mode!r}, tokens={len(self):,}, genes={len(self.gene_to_id):,}, hash={self.hash})"

    def id_of(self, token: str) -> int | None:
        """The id of a token name, or None."""
        return self._index.get(token)

    @property
    def pad_id(self) -> int:
        return self._index["<pad>"]

    @property
    def mask_id(self) -> int:
        return self._index["<mask>"]

    @property
    def cls_id(self) -> int | None:
        return self._index.get("<cls>")

    @property
    def eos_id(self) -> int | None:
        return self._index.get("<eos>")

    def species_token_id(self, species: Species) -> int | None:
        """Id of the ``<human>`` / ``<mouse>`` token (None if the vocabulary has none)."""
        return self._index.get(SPECIES_TOKENS[species])

    @functools.cached_property
    def special_ids(self) -> np.ndarray:
        """Ids of every token that is not a gene (sorted)."""
        return np.array([i for i, t in enumerate(self.tokens) if t.startswith("<") and t.endswith(">")], dtype=np.int64)

    @functools.cached_property
    def is_special(self) -> np.ndarray:
        """Boolean mask over token ids: True for special tokens."""
        mask = np.zeros(len(self), dtype=bool)
        mask[self.special_ids] = True
        return mask

    # -- genes ----------------------------------------------------------------------------
    @functools.cached_property
    def _gene_lookup(self) -> pd.Series:
        return pd.Series(self.gene_to_id, dtype=np.int64)

    def encode_genes(self, ensembl_ids: Iterable[str]) -> np.ndarray:
        """Token ids (int32) of unversioned Ensembl IDs; -1 where a gene is not in the vocabulary."""
        ids = pd.Series(np.asarray(list(ensembl_ids) if not isinstance(ensembl_ids, np.ndarray) else ensembl_ids, dtype=object))
        return ids.map(self._gene_lookup).fillna(-1).to_numpy(dtype=np.int32)

    @functools.cached_property
    def token_species(self) -> np.ndarray:
        """Per token id: -1 special, 0 human gene, 1 mouse gene, 2 shared ortholog token."""
        codes = np.full(len(self), SPECIAL, dtype=np.int8)
        for gene, token in self.gene_to_id.items():
            code = MOUSE if gene.startswith("ENSMUSG") else HUMAN
            codes[token] = code if codes[token] in (SPECIAL, code) else SHARED
        return codes

    def gene_species(self, token_ids: np.ndarray) -> np.ndarray:
        """Species code per token id (see :attr:`token_species`)."""
        return self.token_species[np.asarray(token_ids)]

    @functools.cached_property
    def token_genes(self) -> list[tuple[str, ...]]:
        """Per token id, the Ensembl IDs it stands for (empty for special tokens)."""
        genes: list[list[str]] = [[] for _ in range(len(self))]
        for gene, token in sorted(self.gene_to_id.items()):
            genes[token].append(gene)
        return [tuple(g) for g in genes]

    @functools.cached_property
    def ortholog_map(self) -> np.ndarray:
        """Token id → token id of its one-to-one ortholog in the other species (-1 where none).

        In ``ortholog`` mode a shared token maps to itself. Special tokens map to themselves, so a
        whole sequence can be re-expressed with one gather.
        """
        mapping = np.full(len(self), -1, dtype=np.int32)
        mapping[self.special_ids] = self.special_ids
        pairs = one_to_one_orthologs()
        human = self.encode_genes(pairs["human_id"].to_numpy(dtype=object))
        mouse = self.encode_genes(pairs["mouse_id"].to_numpy(dtype=object))
        ok = (human >= 0) & (mouse >= 0)
        mapping[human[ok]] = mouse[ok]
        mapping[mouse[ok]] = human[ok]
        return mapping

    # -- identity and storage -------------------------------------------------------------
    @functools.cached_property
    def hash(self) -> str:
        """Content hash over token names and the gene map (what models and corpora record)."""
        genes = json.dumps(sorted(self.gene_to_id.items()), separators=(",", ":"))
        return content_hash(self.mode, "\n".join(self.tokens), genes)

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": 1,
            "mode": self.mode,
            "hash": self.hash,
            "n_tokens": len(self),
            "tokens": list(self.tokens),  # copies: editing the dict must not change this vocabulary
            "gene_to_id": dict(self.gene_to_id),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON (atomically)."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocabulary JSON written by :meth:`save`, verifying its content hash."""
        data = read_json(path, "vocabulary", "Geneformer's token_dictionary.pkl converts with `mixgf vocab import-geneformer`.")
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ArtifactError(
                f"{path} is not a mixgeneformer vocabulary (no format={_FORMAT!r}). Build one with `mixgf vocab build` "
                "or convert Geneformer's dictionaries with `mixgf vocab import-geneformer`."
            )
        _check_layout(path, data)
        try:
            vocab = cls(data["tokens"], data["gene_to_id"], data["mode"])
        except ArtifactError as exc:  # duplicate tokens, no <pad> / <mask>, an id past the tokens: name the file
            raise ArtifactError(f"vocabulary {path}: {exc}") from exc
        if vocab.hash != data.get("hash"):
            raise ArtifactError(f"vocabulary {path} does not match its recorded hash; the file was modified or corrupted.")
        vocab.path = Path(path)
        return vocab


def _check_layout(path: str | os.PathLike, data: dict) -> None:
    """ArtifactError unless a vocabulary JSON holds a token list, a gene → token id map and a mode."""
    tokens, gene_to_id, mode = data.get("tokens"), data.get("gene_to_id"), data.get("mode")
    problem = None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        problem = "'tokens' must be a list of token names"
    elif not isinstance(gene_to_id, dict) or not all(type(v) is int and v >= 0 for v in gene_to_id.values()):
        problem = "'gene_to_id' must map gene IDs to token ids (integers from 0)"
    elif mode not in get_args(VocabMode):
        problem = f"'mode' must be one of {list(get_args(VocabMode))}, found {mode!r}"
    if problem:
        raise ArtifactError(
            f"vocabulary {path} is corrupt: {problem}. Rebuild it with `mixgf vocab build` (or convert Geneformer's "
            "dictionaries again with `mixgf vocab import-geneformer`)."
        )


# long: an 18-line docstring; one branch per vocabulary mode.
def build_vocabulary(
    mode: VocabMode = "separate",
    gene_set: GeneSet = "protein_coding",
    medians: GeneMedians | None = None,
    species: Sequence[Species] = SPECIES,
    extra_genes: Iterable[str] = (),
) -> Vocabulary:
    """Build a unified vocabulary.

    Parameters
    ----------
    mode
        ``"separate"`` (every gene its own token) or ``"ortholog"`` (1:1 ortholog pairs share a token).
    gene_set
        ``"protein_coding"`` (default): every protein-coding gene of the chosen species, plus every
        gene that has a median in ``medians`` (so non-coding genes the corpus measures are kept, as
        Geneformer's vocabulary keeps its miRNAs and lncRNAs). ``"medians"``: only genes with a
        median. ``"all"``: every gene in the shipped GENCODE tables.
    medians
        Corpus medians; genes they cover are added (required for ``gene_set="medians"``).
    species
        Which species to include (default both).
    extra_genes
        Further Ensembl IDs to include.
    """
    if mode not in ("separate", "ortholog"):
        raise ConfigError(f"vocabulary mode must be 'separate' or 'ortholog', got {mode!r}.")
    if gene_set not in ("protein_coding", "all", "medians"):
        raise ConfigError(f"gene_set must be 'protein_coding', 'all' or 'medians', got {gene_set!r}.")
    if gene_set == "medians" and medians is None:
        raise ConfigError("gene_set='medians' needs medians (CLI: --medians medians.tsv).")
    species = tuple(species)
    for s in species:
        if s not in SPECIES:
            raise ConfigError(f"unknown species {s!r}; choose from {list(SPECIES)}.")
    if mode == "ortholog" and set(species) != set(SPECIES):
        raise ConfigError(
            f"mode='ortholog' joins human and mouse orthologs into shared tokens, but species={list(species)}; "
            "build it for both species, or use mode='separate' for one."
        )
    chosen: dict[str, list[str]] = {}
    requested = _requested_genes(medians, extra_genes)
    for s in species:
        table = gene_table(s)
        if gene_set == "all":
            keep = np.ones(len(table), dtype=bool)
        elif gene_set == "protein_coding":
            keep = (table["biotype"] == "protein_coding").to_numpy()
        else:
            keep = np.zeros(len(table), dtype=bool)
        chosen[s] = sorted(set(table.loc[keep, "ensembl_id"]) | requested[s])
    if not any(chosen.values()):
        raise GeneIdError("the vocabulary would contain no genes; check gene_set, species and medians.")

    tokens = list(SPECIAL_TOKENS) + [SPECIES_TOKENS[s] for s in SPECIES]
    gene_to_id: dict[str, int] = {}
    paired: dict[str, str] = {}
    if mode == "ortholog" and len(species) == 2:
        pairs = one_to_one_orthologs()
        in_set = pairs["human_id"].isin(set(chosen["human"])) | pairs["mouse_id"].isin(set(chosen["mouse"]))
        paired = dict(zip(pairs.loc[in_set, "human_id"], pairs.loc[in_set, "mouse_id"], strict=True))
        for human_id in sorted(paired):
            gene_to_id[human_id] = gene_to_id[paired[human_id]] = len(tokens)
            tokens.append(f"{human_id}|{paired[human_id]}")
    for s in species:
        for gene in chosen[s]:
            if gene not in gene_to_id:
                gene_to_id[gene] = len(tokens)
                tokens.append(gene)
    return Vocabulary(tokens, gene_to_id, mode)


def _requested_genes(medians: GeneMedians | None, extra_genes: Iterable[str]) -> dict[str, set[str]]:
    """The genes with a median and the ``extra_genes`` (versions stripped), by species. A gene the shipped
    GENCODE tables lack is kept, its prefix giving its species (Geneformer's medians hold 3,395 such IDs)."""
    extra = np.asarray([str(g) for g in extra_genes], dtype=object)
    foreign = ~np.isin(ensembl_species(extra), SPECIES)
    if foreign.any():
        raise GeneIdError(
            f"extra_genes must be human (ENSG…) or mouse (ENSMUSG…) Ensembl IDs; {int(foreign.sum()):,} are not "
            f"(e.g. {', '.join(map(str, extra[foreign][:3]))}). Give the genes' Ensembl IDs."
        )
    ids = np.concatenate([strip_versions(extra), np.asarray(list(medians.values) if medians is not None else [], dtype=object)])
    kinds = ensembl_species(ids)
    return {s: set(ids[kinds == s].tolist()) for s in SPECIES}


def import_geneformer(
    token_dictionary: str | os.PathLike, gene_median_dictionary: str | os.PathLike | None = None
) -> tuple[Vocabulary, GeneMedians | None]:
    """Convert Geneformer's published pickled dictionaries (read with a restricted unpickler).

    Token ids are kept exactly as Geneformer's, so Geneformer checkpoints and corpora stay valid.
    Returns the vocabulary and, when the median dictionary is given, the medians.
    """
    raw = load_restricted_pickle(token_dictionary, "Geneformer token dictionary")
    if not isinstance(raw, dict) or not raw:
        raise ArtifactError(f"{token_dictionary} is not a Geneformer token dictionary (expected a dict of token → id).")
    not_ids = [v for v in raw.values() if not isinstance(v, numbers.Integral)]
    if not_ids:
        raise ArtifactError(
            f"{token_dictionary} is not a Geneformer token dictionary: its values must be integer token ids "
            f"(e.g. token_dictionary.pkl), found {type(not_ids[0]).__name__}."
        )
    by_id = {int(v): str(k) for k, v in raw.items()}
    if len(by_id) != len(raw):
        shared = pd.Series([int(v) for v in raw.values()], index=[str(k) for k in raw]).duplicated(keep=False)
        raise ArtifactError(
            f"{token_dictionary}: tokens {', '.join(shared.index[shared][:3])} share one token id; a token "
            "dictionary gives each token its own id. The dictionary is corrupt: download it again."
        )
    if sorted(by_id) != list(range(len(by_id))):
        raise ArtifactError(f"{token_dictionary}: token ids are not contiguous 0..{len(by_id) - 1}; the dictionary is corrupt.")
    tokens = [by_id[i] for i in range(len(by_id))]
    gene_to_id = {t.upper(): i for i, t in enumerate(tokens) if not (t.startswith("<") and t.endswith(">"))}
    try:
        vocab = Vocabulary(tokens, gene_to_id, "geneformer")
    except ArtifactError as exc:  # e.g. no <pad> / <mask> token: name the dictionary
        raise ArtifactError(f"{token_dictionary} is not a usable Geneformer token dictionary: {exc}") from exc
    medians = None
    if gene_median_dictionary is not None:
        # lazy: medians pulls the readers (anndata, h5py, numba), about 1 s more start-up for
        # every `mixgf` command (cli/vocab imports this module at start-up)
        from .medians import GeneMedians

        raw_medians = load_restricted_pickle(gene_median_dictionary, "Geneformer gene median dictionary")
        if not isinstance(raw_medians, dict) or not all(isinstance(v, numbers.Real) for v in raw_medians.values()):
            raise ArtifactError(
                f"{gene_median_dictionary} is not a Geneformer gene median dictionary (expected a dict of Ensembl ID → "
                "median number, e.g. gene_median_dictionary.pkl)."
            )
        medians = GeneMedians({str(k).upper(): float(v) for k, v in raw_medians.items()})
    return vocab, medians
