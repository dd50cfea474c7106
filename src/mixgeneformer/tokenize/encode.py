"""Rank-value encoding: the pure, vectorized core and chunks of counts -> Arrow tables."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from ..errors import ConfigError, GeneIdError, NoTokenizableCellError
from ..genes import SPECIES, ensembl_species
from ..jit import njit
from ..medians import GeneMedians, compute_medians
from ..readers import (
    CountChunk,
    canonical_csr,
    filter_pass_rows,
    normalization_totals,
    remap_columns,
    row_sums,
)
from .config import TokenizeConfig
from .obs import _obs_array

logger = logging.getLogger(__name__)


@njit
def _radix_pass(src_key, src_idx, dst_key, dst_idx, m, shift, count):  # pragma: no cover - numba
    """One stable LSD pass on 8 bits of uint32 keys; returns False (nothing moved) if the digit is constant."""
    count[:] = 0
    for i in range(m):
        count[(src_key[i] >> shift) & 0xFF] += 1
    for b in range(256):
        if count[b] == m:
            return False
    total = 0
    for b in range(256):
        c = count[b]
        count[b] = total
        total += c
    for i in range(m):
        d = (src_key[i] >> shift) & 0xFF
        j = count[d]
        dst_key[j] = src_key[i]
        dst_idx[j] = src_idx[i]
        count[d] = j + 1
    return True


# long: one numba kernel over the rows of a chunk; a call per row would cost more than the work.
@njit
def _rank_rows(indptr, indices, data, col_token, col_median, totals, max_len, out_tokens, out_lengths):  # pragma: no cover
    """Rank-value encode every CSR row; returns the number of tokens written to ``out_tokens``.

    Per row: values in float64 with Geneformer's operation order; a stable LSD radix sort (8-bit
    digits, constant digits skipped) on the inverted float32 bits orders them descending; runs
    of equal float32 keys are then insertion-sorted by the exact float64 value, ties by token id.
    """
    n_rows = len(indptr) - 1
    width = 1
    for r in range(n_rows):
        width = max(width, indptr[r + 1] - indptr[r])
    values = np.empty(width, np.float64)
    tokens = np.empty(width, np.int32)
    key_a = np.empty(width, np.uint32)
    key_b = np.empty(width, np.uint32)
    idx_a = np.empty(width, np.int32)
    idx_b = np.empty(width, np.int32)
    value32 = np.empty(1, np.float32)
    value32_bits = value32.view(np.uint32)
    count = np.empty(256, np.int64)
    position = 0
    for r in range(n_rows):
        total = totals[r]
        m = 0
        if total > 0:
            for j in range(indptr[r], indptr[r + 1]):
                column = indices[j]
                token = col_token[column]
                x = data[j]
                if token >= 0 and x > 0:
                    value = x / total * 10000.0 / col_median[column]  # Geneformer's order of operations
                    values[m] = value
                    tokens[m] = token
                    value32[0] = value
                    key_a[m] = ~value32_bits[0]  # positive floats: bits are monotone; invert for descending
                    idx_a[m] = m
                    m += 1
        src_key, src_idx, dst_key, dst_idx = key_a, idx_a, key_b, idx_b
        for shift in (0, 8, 16, 24):
            if _radix_pass(src_key, src_idx, dst_key, dst_idx, m, shift, count):
                src_key, src_idx, dst_key, dst_idx = dst_key, dst_idx, src_key, src_idx
        i = 0
        while i < m:
            k = i + 1
            while k < m and src_key[k] == src_key[i]:
                k += 1
            for a in range(i + 1, k):  # insertion sort of a run of equal float32 keys (rare, short)
                e = src_idx[a]
                b = a - 1
                while b >= i and (
                    values[e] > values[src_idx[b]] or (values[e] == values[src_idx[b]] and tokens[e] < tokens[src_idx[b]])
                ):
                    src_idx[b + 1] = src_idx[b]
                    b -= 1
                src_idx[b + 1] = e
            i = k
        keep = min(m, max_len)
        for a in range(keep):
            out_tokens[position + a] = tokens[src_idx[a]]
        out_lengths[r] = keep
        position += keep
    return position


def rank_value_encode(
    counts: sp.csr_matrix,
    token_ids: np.ndarray,
    medians: np.ndarray,
    totals: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-value encode every cell of a CSR chunk.

    Parameters
    ----------
    counts
        Cells × genes CSR raw counts.
    token_ids
        Token id per column (``-1``: not in the vocabulary). Columns sharing a token are summed,
        each normalised by its own median (exact sums of counts when the medians agree).
    medians
        Median per column (NaN or ≤ 0: column ignored).
    totals
        Per-cell normalization total; cells with total ≤ 0 get an empty sequence.
    max_len
        Gene tokens kept per cell.

    Returns
    -------
    flat_tokens : np.ndarray[int32]
        All cells' tokens concatenated (cell order kept).
    lengths : np.ndarray[int64]
        Tokens per cell (0 for cells without any expressed vocabulary gene).
    """
    counts = canonical_csr(counts)  # a gene stored twice in a cell is one count
    n_rows = counts.shape[0]
    token_ids = np.asarray(token_ids, dtype=np.int64)
    medians = np.asarray(medians, dtype=np.float64)
    totals = np.asarray(totals, dtype=np.float64)
    if token_ids.shape != (counts.shape[1],) or medians.shape != (counts.shape[1],) or totals.shape != (n_rows,):
        raise ValueError("token_ids / medians must have one entry per column and totals one per row")
    usable = (token_ids >= 0) & np.isfinite(medians) & (medians > 0)
    token_ids = np.where(usable, token_ids, -1)
    if len(token_ids[usable]) != len(np.unique(token_ids[usable])):
        counts, token_ids, medians = _merge_shared_tokens(counts, token_ids, medians, usable)
    if n_rows == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    flat = np.empty(counts.nnz, dtype=np.int32)
    lengths = np.empty(n_rows, dtype=np.int64)
    written = _rank_rows(
        counts.indptr, counts.indices, counts.data, token_ids.astype(np.int32),
        np.where(token_ids >= 0, medians, 1.0), totals, max_len, flat, lengths,
    )
    return flat[:written], lengths


def _merge_shared_tokens(
    counts: sp.csr_matrix, token_ids: np.ndarray, medians: np.ndarray, usable: np.ndarray
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """One column per distinct token of the ``usable`` columns: (counts, token ids, medians).

    Columns of one token with different medians (a human gene and its mouse ortholog in one file)
    are each normalised by their own median before the sum: scaled by token median / own median.
    Where the medians agree (a gene in two columns) the counts are summed exactly.
    """
    distinct, first, inverse = np.unique(token_ids[usable], return_index=True, return_inverse=True)
    column_map = np.full(len(token_ids), -1, dtype=np.int64)
    column_map[usable] = inverse
    token_median = medians[usable][first]
    scale = np.ones(len(token_ids))
    scale[usable] = token_median[inverse] / medians[usable]
    if (scale != 1.0).any():
        counts = sp.csr_matrix(counts.astype(np.float64) @ sp.diags(scale))
    return remap_columns(counts, column_map, len(distinct)), distinct, token_median


def add_special_tokens(
    flat: np.ndarray, lengths: np.ndarray, prefix: Sequence[int | np.ndarray] = (), suffix: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``prefix`` tokens before and ``suffix`` tokens after every sequence (vectorized). A
    prefix entry may be an array with one token per sequence (the species token of mixed inputs)."""
    n_pre, n_suf = len(prefix), len(suffix)
    if n_pre == 0 and n_suf == 0:
        return flat, lengths
    new_lengths = lengths + n_pre + n_suf
    ends = np.cumsum(new_lengths)
    starts = ends - new_lengths
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    is_gene = np.ones(len(out), dtype=bool)
    for i, token in enumerate(prefix):
        out[starts + i] = token
        is_gene[starts + i] = False
    for i, token in enumerate(suffix):
        out[ends - n_suf + i] = token
        is_gene[ends - n_suf + i] = False
    out[is_gene] = flat
    return out, new_lengths


@dataclass
class _Columns:
    """Per-input column lookups: token id, median and vocabulary membership per matrix column."""

    token_ids: np.ndarray
    medians: np.ndarray
    kept: np.ndarray
    species: str
    coverage: str
    column_species: np.ndarray | None = None  # per column 0 human / 1 mouse / -1: inputs holding both species' genes


def _mixed_species_columns(ensembl: np.ndarray, kept: np.ndarray) -> np.ndarray | None:
    """Per column the index in SPECIES of its gene's species (-1 if not kept), when the kept columns
    hold genes of both species (a human + mouse reference, e.g. a barnyard experiment); else None."""
    codes = pd.Series(ensembl_species(ensembl)).map({s: i for i, s in enumerate(SPECIES)}).fillna(-1).to_numpy(np.int8)
    codes[~kept] = -1
    return codes if all((codes == i).any() for i in range(len(SPECIES))) else None


def cell_species(counts: sp.spmatrix, columns: _Columns) -> np.ndarray:
    """Per cell the index in SPECIES of its species: the input's, or in an input holding both
    species' genes, the species whose genes hold more of the cell's counts (ties: the input's)."""
    default = SPECIES.index(columns.species)
    if columns.column_species is None:
        return np.full(counts.shape[0], default, dtype=np.int8)
    indicator = np.stack([columns.column_species == i for i in range(len(SPECIES))], axis=1).astype(np.float64)
    per_species = np.asarray(counts @ indicator)
    best = per_species.argmax(axis=1)
    tied = per_species.max(axis=1) == per_species[:, default]
    return np.where(tied, default, best).astype(np.int8)


def _column_lookup(source: Any, vocab: Any, medians: GeneMedians, config: TokenizeConfig) -> _Columns:
    mapping = config.read_options.map_genes(source, vocab.gene_to_id)
    ensembl = mapping.ensembl_ids
    if config.duplicate_genes == "error":
        _check_duplicate_genes(source.name, np.asarray(source.gene_ids, dtype=object), ensembl)
    token_ids = np.asarray(vocab.encode_genes(ensembl), dtype=np.int64)
    gene_medians = medians.lookup(ensembl)
    kept = (token_ids >= 0) & np.isfinite(gene_medians)
    if not kept.any():
        raise GeneIdError(
            f"{source.name}: none of its {len(ensembl):,} genes is in the vocabulary with a median "
            f"({mapping.coverage_report()}). Wrong species, or a vocabulary/median table for another species?"
        )
    coverage = f"{mapping.coverage_report()}; {int(kept.sum()):,} columns in the vocabulary with a median"
    shared = _shared_gene_columns(ensembl) & kept
    if shared.any():  # duplicate_genes="sum" (with "error" this input was refused above)
        coverage += f"; {int(shared.sum()):,} columns resolve to a gene another column has too and are summed"
    orthologs = kept & ~shared & pd.Series(np.where(kept, token_ids, -1)).duplicated(keep=False).to_numpy()
    if orthologs.any():  # e.g. human and mouse genes of one ortholog token in a mixed-species file
        coverage += (f"; {int(orthologs.sum()):,} columns of different genes share a token (orthologs) and are "
                     "summed after each is divided by its own median")
    column_species = _mixed_species_columns(ensembl, kept) if config.allow_mixed_species else None
    if column_species is not None:
        coverage += "; genes of both species: each cell is given the species whose genes hold more of its counts"
    _check_species_tokens(source.name, SPECIES if column_species is not None else (mapping.species,), vocab, config)
    logger.info("%s: %s", source.name, coverage)
    return _Columns(token_ids, gene_medians, kept, mapping.species, coverage, column_species)


def _check_species_tokens(name: str, species: Sequence[str], vocab: Any, config: TokenizeConfig) -> None:
    """ConfigError when an input's cells (of ``species``) need a species token the vocabulary lacks."""
    missing = [s for s in species if vocab.species_token_id(s) is None]
    if config.add_species_token and missing:
        raise ConfigError(f"{name} has {' and '.join(missing)} cells, and the vocabulary has no species token for "
                          "them (add_species_token=True); use a vocabulary built by `mixgf vocab build`, or add_species_token=False.")


def _shared_gene_columns(ensembl: np.ndarray) -> np.ndarray:
    """True for the columns that resolve to a gene another column resolves to as well."""
    mapped = pd.Series(ensembl)
    return (mapped.ne("") & mapped.duplicated(keep=False)).to_numpy()


def _check_duplicate_genes(name: str, columns: np.ndarray, ensembl: np.ndarray) -> None:
    """GeneIdError naming the user's columns that resolve to one gene (duplicate_genes='error')."""
    repeated = _shared_gene_columns(ensembl)
    if not repeated.any():
        return
    groups = pd.Series(columns[repeated]).groupby(np.asarray(ensembl)[repeated], sort=False)
    gene, names = next(iter(groups))
    shown = ", ".join(repr(str(c)) for c in names.iloc[:5])
    raise GeneIdError(
        f"{name}: {groups.ngroups:,} genes appear in several columns; e.g. columns {shown} all resolve to {gene}. "
        "Remove or rename the duplicate columns, or use duplicate_genes='sum' (mixgf tokenize --duplicate-genes sum; "
        "the other commands: duplicate_genes: sum in --tokenize-config; Geneformer sums them)."
    )


@dataclass
class TokenizeReport:
    """Counts of one tokenization run (also written to ``mixgf_corpus.json``)."""

    cells_in: int = 0
    cells_out: int = 0
    dropped_filter_pass: int = 0
    dropped_zero_counts: int = 0
    dropped_no_vocab_gene: int = 0
    cells_human: int = 0  # of cells_out
    cells_mouse: int = 0
    tokens: int = 0
    counts: float = 0.0  # every count read
    counts_in_vocabulary: float = 0.0  # those on genes of the vocabulary with a median
    seconds: float = 0.0
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: TokenizeReport) -> None:
        for name in ("cells_in", "cells_out", "dropped_filter_pass", "dropped_zero_counts", "dropped_no_vocab_gene",
                     "cells_human", "cells_mouse", "tokens", "counts", "counts_in_vocabulary"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def cells_per_second(self) -> float:
        return self.cells_in / self.seconds if self.seconds > 0 else float("nan")

    @property
    def counts_fraction(self) -> float:
        """The fraction of all counts that fall on vocabulary genes with a median (NaN without counts)."""
        return self.counts_in_vocabulary / self.counts if self.counts > 0 else float("nan")

    def summary(self) -> str:
        counts = f"; {self.counts_fraction:.1%} of counts on vocabulary genes" if self.counts > 0 else ""
        return (
            f"{self.cells_in:,} cells in, {self.cells_out:,} out ({self.cells_human:,} human, {self.cells_mouse:,} mouse); dropped: {self.dropped_zero_counts:,} with zero counts, "
            f"{self.dropped_no_vocab_gene:,} without a vocabulary gene, {self.dropped_filter_pass:,} by filter_pass; "
            f"{self.tokens:,} tokens{counts}; {self.seconds:.1f}s ({self.cells_per_second:,.0f} cells/s)"
        )


def warn_low_counts_coverage(name: str, counts: float, in_vocabulary: float, min_coverage: float) -> None:
    """Log a warning when under ``min_coverage`` of an input's counts fall on vocabulary genes.

    The gene-ID check before tokenizing counts identifiers; this one counts expression, so it
    catches files whose most expressed genes are unknown (other symbols, another annotation).
    """
    if counts > 0 and in_vocabulary / counts < min_coverage:
        logger.warning(
            "%s: only %.1f%% of its counts fall on genes of the vocabulary with a median (min_coverage=%.0f%%): the "
            "cells' most expressed genes are missing from their tokens. Check the species, the gene column "
            "(--gene-column) and the gene symbols (outdated symbols are not mapped).",
            name, 100 * in_vocabulary / counts, 100 * min_coverage,
        )


def _encode_chunk(
    chunk: CountChunk, columns: _Columns, vocab: Any, config: TokenizeConfig, obs_columns: Sequence[str], obs_types: dict[str, pa.DataType]
) -> tuple[pa.Table, TokenizeReport]:
    report = TokenizeReport(cells_in=chunk.n_cells)
    per_gene = np.asarray(chunk.counts.sum(axis=0), dtype=np.float64).ravel()
    report.counts, report.counts_in_vocabulary = float(per_gene.sum()), float(per_gene[columns.kept].sum())
    totals = normalization_totals(chunk, config.totals, columns.kept)
    passing = filter_pass_rows(chunk) if config.filter_pass else None
    if passing is not None:
        report.dropped_filter_pass = int((~passing).sum())
        totals = np.where(passing, totals, 0.0)
    flat, lengths = rank_value_encode(chunk.counts, columns.token_ids, columns.medians, totals, config.max_genes)
    filtered = ~passing if passing is not None else np.zeros(chunk.n_cells, dtype=bool)
    zero = ~(row_sums(chunk.counts) > 0) & ~filtered
    keep = lengths > 0
    report.dropped_zero_counts = int(zero.sum())
    report.dropped_no_vocab_gene = int((~keep & ~zero & ~filtered).sum())
    species = cell_species(chunk.counts, columns)[keep]
    if not keep.all():
        flat = flat[np.repeat(keep, lengths)]
        lengths = lengths[keep]
    prefix: list[int | np.ndarray] = []
    suffix: list[int] = []
    if config.style == "v2":
        prefix.append(vocab.cls_id)
        suffix.append(vocab.eos_id)
    if config.add_species_token:
        token_of = np.asarray([vocab.species_token_id(s) or 0 for s in SPECIES])  # a missing one is refused above
        prefix.append(token_of[species])
    flat, lengths = add_special_tokens(flat, lengths, prefix, suffix)
    report.cells_out = int(len(lengths))
    report.cells_human, report.cells_mouse = (int((species == i).sum()) for i in range(len(SPECIES)))
    report.tokens = int(len(flat))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = {
        "input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
        if offsets[-1] >= 2**31
        else pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=pa.int32())),
        "length": pa.array(lengths.astype(np.int32)),
        "species": pa.DictionaryArray.from_arrays(pa.array(species.astype(np.int32)), pa.array(list(SPECIES))).cast(pa.string()),
        "cell_index": pa.array((chunk.start + np.flatnonzero(keep)).astype(np.int64)),
    }
    obs = chunk.obs.iloc[np.flatnonzero(keep)]
    for column in obs_columns:
        arrays[column] = _obs_array(obs[column], obs_types[column])
    return pa.table(arrays), report


def _features(obs_types: dict[str, pa.DataType]) -> Any:
    schema = pa.schema(
        [("input_ids", pa.list_(pa.int32())), ("length", pa.int32()), ("species", pa.string()), ("cell_index", pa.int64())]
        + list(obs_types.items())
    )
    return datasets.Features.from_arrow_schema(schema)


def _check_vocab(vocab: Any, config: TokenizeConfig, medians: GeneMedians | None = None) -> None:
    """The vocabulary suits ``config``, and the median table (medians='corpus') was built for it."""
    if config.medians == "corpus" and medians is not None:
        medians.check_vocabulary(vocab.gene_to_id, config.min_coverage, getattr(vocab, "path", None))
    if config.style == "v2" and (vocab.cls_id is None or vocab.eos_id is None):
        raise ConfigError(
            "style='v2' needs <cls> and <eos> tokens, which this vocabulary lacks (a Geneformer V1 vocabulary?). "
            "Use style='v1' or a vocabulary built with `mixgf vocab`."
        )
    if config.add_species_token and (vocab.species_token_id("human") is None and vocab.species_token_id("mouse") is None):
        raise ConfigError("add_species_token=True but the vocabulary has no species tokens; set it to false.")


def _check_not_empty(report: TokenizeReport, what: str) -> None:
    if report.cells_out == 0:
        raise NoTokenizableCellError(
            f"{what}: no cell could be tokenized ({report.summary()}). Check that the matrix holds raw counts of "
            "genes in the vocabulary (species? gene IDs?) and that filter_pass is not 0 everywhere."
        )


def _medians_for(item: Any, medians: GeneMedians | None, config: TokenizeConfig, vocab: Any = None) -> GeneMedians | None:
    """The median table of ``config.medians='corpus'``; None for 'per_file' (computed per input by
    the caller, or here when ``item`` is given). A table passed with 'per_file' would be ignored: refused."""
    if config.medians == "corpus":
        if medians is None:
            raise ConfigError("medians='corpus' needs a median table; pass medians= (CLI: --medians medians.tsv).")
        return medians
    if medians is not None:
        raise ConfigError(
            "medians='per_file' normalizes each input by its own medians, and a median table was passed too "
            "(it would be ignored): pass medians=None, or use medians='corpus' to normalize by the table."
        )
    if item is None:
        return None
    return compute_medians([item], read=config.read_options, vocabulary_ids=None if vocab is None else vocab.gene_to_id)


def _iter_tables(item: Any, vocab: Any, medians: GeneMedians, config: TokenizeConfig, obs_columns: Sequence[str], obs_types: dict[str, pa.DataType], start: int = 0, stop: int | None = None):
    with config.read_options.open(item) as source:
        columns = _column_lookup(source, vocab, medians, config)
        extra = [c for c in ("n_counts", "filter_pass") if c in source.obs_columns and c not in obs_columns]
        if not config.filter_pass and "filter_pass" in extra:
            extra.remove("filter_pass")
        if config.totals != "all" and "n_counts" in extra:
            extra.remove("n_counts")
        source.check_obs_columns(obs_columns)
        for chunk in source.iter_chunks(config.chunk_size, obs_columns=[*obs_columns, *extra], start=start, stop=stop):
            table, report = _encode_chunk(chunk, columns, vocab, config, obs_columns, obs_types)
            yield table, report, columns
