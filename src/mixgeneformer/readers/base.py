"""The chunk every reader yields, its validation, and the CountSource interface."""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputDataError, MixGeneformerError, name_list
from ..fileio import h5ad_read_errors

#: What h5py, gzip, pandas, scipy and numpy raise on a damaged or malformed file (the package's own
#: errors pass through :func:`reading` unchanged).
#: IORegistryError (h5ad_read_errors): an obs column / matrix encoding this anndata cannot decode (a newer anndata's)
READ_ERRORS = (OSError, EOFError, KeyError, IndexError, ValueError, TypeError, NotImplementedError, zlib.error,
               *h5ad_read_errors())

#: what every reader opens: a path (``.h5ad``, ``.loom``, 10x ``.h5`` / mtx folder, SOMA URI) or an AnnData
CountInput: TypeAlias = str | os.PathLike[str] | ad.AnnData


def _read_errors() -> tuple[type[BaseException], ...]:
    """:data:`READ_ERRORS`, with TileDB-SOMA's ``SOMAError`` (a damaged experiment) once ``tiledbsoma`` is loaded
    (it is imported for a SOMA input only)."""
    soma = sys.modules.get("tiledbsoma")
    return READ_ERRORS + ((soma.SOMAError,) if isinstance(getattr(soma, "SOMAError", None), type) else ())


@contextlib.contextmanager
def reading(where: str, what: str) -> Iterator[None]:
    """Turn a reader library's exception while ``what`` into one :class:`InputDataError` naming the file."""
    try:
        yield
    except MixGeneformerError:
        raise
    except _read_errors() as exc:
        raise InputDataError(
            f"{where}: {what} failed ({type(exc).__name__}: {exc}). The file is damaged, truncated or not in the "
            "format its name says; check that anndata / scanpy can read it, or export it again."
        ) from exc


def check_compressed(indptr: np.ndarray, n_outer: int, n_stored: int, where: str) -> None:
    """The pointer array of a CSR / CSC matrix on disk: ``n_outer + 1`` entries from 0, never
    decreasing, ending at the number of stored values (else rows would be dropped or misread)."""
    problem = (
        f"{indptr.size} pointers for {n_outer} rows/columns" if indptr.size != n_outer + 1
        else f"the first pointer is {indptr[0]}, not 0" if indptr[0] != 0
        else f"pointers decrease at position {int(np.flatnonzero(np.diff(indptr) < 0)[0]) + 1}" if (np.diff(indptr) < 0).any()
        else f"the last pointer is {indptr[-1]} but {n_stored} values are stored" if indptr[-1] != n_stored
        else ""
    )
    if problem:
        raise InputDataError(f"{where}: the sparse count matrix is corrupt ({problem}); export the file again.")


def checked_csr(matrix: sp.csr_matrix, where: str, start: int) -> sp.csr_matrix:
    """``matrix`` after scipy's full structure check (column indices in range, sorted pointers):
    a corrupt index would otherwise be read out of bounds by the compiled kernels."""
    try:
        matrix.check_format(full_check=True)
    except ValueError as exc:
        raise InputDataError(
            f"{where}: the sparse count matrix is corrupt in cells {start}–{start + matrix.shape[0] - 1} ({exc}); "
            "export the file again."
        ) from exc
    return matrix


def as_csr(counts: sp.spmatrix | sp.sparray | np.ndarray) -> sp.csr_matrix | sp.csr_array:
    """``counts`` itself when it is CSR (matrix or array: no copy), else converted to a CSR matrix."""
    return counts if sp.issparse(counts) and counts.format == "csr" else sp.csr_matrix(counts)


def canonical_csr(counts: sp.spmatrix | sp.sparray | np.ndarray) -> sp.csr_matrix:
    """``counts`` as CSR with one stored entry per (cell, gene), summed, and sorted columns. A matrix
    built from data / indices / indptr may store a cell's gene twice; every consumer reads the stored
    entries as the gene's count (the caller's matrix is never modified)."""
    if not isinstance(counts, sp.csr_matrix):
        counts = sp.csr_matrix(counts)
    if not counts.has_canonical_format:
        counts = counts.copy()
        counts.sum_duplicates()
    return counts


#: The ``layer`` that reads the counts an AnnData keeps in ``.raw`` (scanpy's ``adata.raw = adata``):
#: ``adata.raw.X`` (h5ad: ``raw/X``) with the genes of ``adata.raw.var``. An input with a layer of
#: that name reads the layer, as before (a SOMA experiment's X layer ``raw``, CELLxGENE Census).
RAW_LAYER = "raw"

def missing_layer(where: str, layer: str, layers: list[str], raw_genes: int | None) -> InputDataError:
    """The error for a ``layer`` an AnnData / h5ad lacks, listing its layers and its ``.raw`` (``raw_genes``
    genes, or None without one)."""
    if raw_genes is not None:
        also = f"; layer='raw' reads its .raw, {raw_genes:,} genes"
    else:
        also = "; layer='raw' reads .raw (adata.raw.X), and it has none" if layer == RAW_LAYER else ""
    return InputDataError(f"{where}: layer {layer!r} not found. Available layers: {layers} (or leave layer unset "
                          f"to read X{also}).")


_SAMPLE_VALUES = 1 << 16  # stored values of .raw looked at to tell counts from normalized data


def _stored_values(matrix: Any, limit: int = _SAMPLE_VALUES) -> np.ndarray:
    """Up to ``limit`` stored values of a cells × genes matrix (scipy sparse, numpy, an h5py dataset or
    sparse group, an anndata backed sparse dataset), read from its first cells only."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data[:limit])
    if hasattr(matrix, "keys") and "data" in matrix:  # an h5py sparse group
        return np.asarray(matrix["data"][:limit])
    shape = getattr(matrix, "shape", ())
    if len(shape) != 2 or shape[1] == 0:
        return np.zeros(0)
    block = matrix[: max(1, limit // int(shape[1]))]
    values = block.data if sp.issparse(block) else np.asarray(block).ravel()
    return values[values != 0]


def _looks_like_counts(values: np.ndarray) -> bool:
    """Whether sampled stored values are counts: some positive, all finite, non-negative integers."""
    values = np.asarray(values)
    if values.size == 0 or values.dtype.kind not in "iuf":
        return False
    if values.dtype.kind == "f" and not (np.isfinite(values).all() and (values == np.rint(values)).all()):
        return False
    return bool((values >= 0).all() and (values > 0).any())


@dataclass
class CountChunk:
    """A block of consecutive cells of one source.

    Attributes
    ----------
    counts
        Raw counts, cells × genes, CSR (integer or float dtype), already validated.
    gene_ids
        Gene identifiers (str, object array) aligned with the columns of ``counts``.
    obs
        Per-cell metadata, rows aligned with ``counts``; the index holds cell names.
    start
        Index of the chunk's first cell within its source.
    """

    counts: sp.csr_matrix
    gene_ids: np.ndarray
    obs: pd.DataFrame
    start: int

    @property
    def n_cells(self) -> int:
        """Number of cells (rows) in the chunk."""
        return int(self.counts.shape[0])


# long: a 23-line docstring; one vectorized check per RELIABILITY rule.
def validate_counts(
    counts: sp.csr_matrix,
    *,
    allow_fractional: bool = False,
    start: int = 0,
    cell_names: Sequence[str] | np.ndarray | None = None,
    gene_ids: np.ndarray | None = None,
    where: str = "input",
    fix: str | None = None,
) -> None:
    """Check that a CSR block holds raw counts: finite, non-negative and (by default) integer.

    Vectorized over the stored values. Errors name the first offending value, its cell (index and
    name) and gene, and the fix.

    Parameters
    ----------
    counts
        Cells × genes CSR block (another sparse format or a dense array is converted).
    allow_fractional
        Accept non-integer values (e.g. ambient-corrected counts); negative / NaN / Inf are still errors.
    start
        Index of the block's first cell in its source (for messages).
    cell_names, gene_ids
        Names used in messages (optional).
    where
        What the data is (file name), for messages.
    fix
        What to do instead, replacing the messages' general advice (e.g. read the counts in ``.raw``).

    Raises
    ------
    InputDataError
        On NaN / Inf, negative or (unless allowed) non-integer values.
    """
    counts = as_csr(counts)  # another format / dense: its cells and genes located right
    data = counts.data
    if data.size == 0 or data.dtype == np.bool_:
        return

    def locate(mask: np.ndarray) -> str:
        k = int(np.flatnonzero(mask)[0])
        row = int(np.searchsorted(counts.indptr, k, side="right") - 1)
        col = int(counts.indices[k])
        cell = f"cell {start + row}"
        if cell_names is not None:
            cell += f" ({cell_names[row]!s})"
        gene = f"gene column {col}"
        if gene_ids is not None:
            gene += f" ({gene_ids[col]!s})"
        return f"{data[k].item()!r} at {cell}, {gene}"

    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            n_bad = int((~finite).sum())
            raise InputDataError(
                f"{where}: counts contain NaN or Inf ({n_bad} values; first: {locate(~finite)}). "
                "Raw UMI counts are required: "
                + (fix or "remove or fix these cells, or read the raw counts layer (layer='counts').")
            )
    if not np.issubdtype(data.dtype, np.unsignedinteger):
        negative = data < 0
        if negative.any():
            raise InputDataError(
                f"{where}: counts contain {int(negative.sum())} negative values (first: {locate(negative)}). "
                "Raw counts cannot be negative: the matrix looks scaled or batch-corrected; "
                + (fix or "read the raw counts instead (layer='counts').")
            )
    if not allow_fractional and np.issubdtype(data.dtype, np.floating):
        fractional = data != np.rint(data)
        if fractional.any():
            raise InputDataError(
                f"{where}: expects raw integer counts in the matrix read; found {locate(fractional)} "
                f"({int(fractional.sum())} non-integer values in cells {start}–{start + counts.shape[0] - 1}). "
                "The data look normalized or log-transformed: "
                + (fix or "read a matrix of raw counts instead (e.g. layer='counts': `--layer counts` for medians / tokenize, "
                   "`layer: counts` in the --tokenize-config YAML for embed / classify / perturb / predict), or "
                   "allow_fractional=True (`--allow-fractional`, or `allow_fractional: true` in that YAML) if "
                   "they are deliberately non-integer.")
            )


def _decode(values: Any) -> np.ndarray:
    """h5py byte strings / numbers → object array of str."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8").astype(object)
    if arr.dtype.kind == "O":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr], dtype=object)
    return arr.astype(str).astype(object)


def _libc_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and chunk after chunk of
    differently sized arrays makes a streaming process's RSS creep up with the corpus size)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class CountSource:
    """A count matrix that can be read in chunks of consecutive cells.

    Attributes
    ----------
    n_cells, n_genes
        Matrix shape (cells × genes).
    gene_ids
        Gene identifiers aligned with the columns (object array of str).
    obs_columns
        Names of per-cell metadata columns available to ``iter_chunks(obs_columns=...)``.
    name
        Human-readable description of the source (file name) for messages.
    """

    n_cells: int
    n_genes: int
    gene_ids: np.ndarray
    obs_columns: list[str]
    name: str
    allow_fractional: bool = False
    #: whether the matrix read is the input's ``.raw`` (``layer="raw"``)
    reads_raw: bool = False
    #: ``(matrix getter, n_genes)`` of the input's ``.raw`` when another matrix is read (for messages only)
    _raw_beside: tuple[Callable[[], Any], int] | None = None

    # -- implemented by each format --------------------------------------------------------------
    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _obs_column(self, column: str, start: int, stop: int) -> pd.Series | np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (sources are also context managers)."""

    # -- shared -----------------------------------------------------------------------------------
    def __enter__(self) -> CountSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.n_cells} cells × {self.n_genes} genes)"

    def check_obs_columns(self, columns: Sequence[str]) -> None:
        """Raise :class:`InputDataError` naming the missing columns and the available ones."""
        missing = [c for c in name_list(columns, "obs_columns") if c not in self.obs_columns]
        if missing:
            raise InputDataError(
                f"{self.name}: obs column(s) {missing} not found. Available obs columns: "
                f"{sorted(self.obs_columns)}."
            )

    def obs(self, columns: Sequence[str] = (), start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Per-cell metadata of cells [start, stop) (only ``columns``), indexed by cell name.

        Only that row range is read where the format allows (h5ad, loom, 10x), so memory stays
        bounded by the chunk, not the corpus.
        """
        columns = name_list(columns, "obs columns")
        self.check_obs_columns(columns)
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        names = pd.Index(np.asarray(self._obs_names(start, stop)).astype(str), name=None)
        frame = pd.DataFrame(index=names)
        for column in columns:
            with reading(self.name, f"reading obs column {column!r} of cells {start}–{stop - 1}"):
                values = self._obs_column(column, start, stop)
            if len(values) != len(names):  # a frame of no names would take the values' index: cells named 0, 1, …
                raise InputDataError(f"{self.name}: obs column {column!r} has {len(values)} values for the {len(names)} cell "
                                     f"names of cells {start}–{stop - 1}; obs is inconsistent (the file is damaged): export it again.")
            frame[column] = values.to_numpy() if isinstance(values, pd.Series) else values
        return frame

    def iter_chunks(
        self,
        chunk_size: int = 10_000,
        obs_columns: Sequence[str] = (),
        start: int = 0,
        stop: int | None = None,
        validate: bool = True,
    ) -> Iterator[CountChunk]:
        """Yield consecutive :class:`CountChunk` blocks of at most ``chunk_size`` cells.

        Parameters
        ----------
        chunk_size
            Cells per chunk (≥ 1).
        obs_columns
            Metadata columns to attach, one name or a list (error listing the available ones when missing).
        start, stop
            Cell range to read (default: all cells).
        validate
            Check every chunk holds raw counts (see :func:`validate_counts`).
        """
        if chunk_size < 1:
            raise InputDataError(f"chunk_size must be ≥ 1, got {chunk_size}.")
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        for lo in range(start, stop, chunk_size):
            hi = min(lo + chunk_size, stop)
            if lo > start:
                release_free_memory()  # the previous chunk's buffers are garbage by now
            with reading(self.name, f"reading cells {lo}–{hi - 1}"):
                counts = self._read_rows(lo, hi)
                counts = canonical_csr(counts)
                chunk_obs = self.obs(name_list(obs_columns, "obs_columns"), lo, hi)
            if len(chunk_obs) != hi - lo:
                raise InputDataError(f"{self.name}: cells {lo}–{hi - 1} have {len(chunk_obs)} obs names for {hi - lo} "
                                     "matrix rows; obs and the matrix disagree (the file is damaged): export it again.")
            if counts.shape != (hi - lo, self.n_genes):
                raise InputDataError(
                    f"{self.name}: rows {lo}–{hi} have shape {counts.shape}, expected {(hi - lo, self.n_genes)}; "
                    "the file is inconsistent (truncated or corrupt)."
                )
            counts = self._checked_counts(counts, chunk_obs.index, lo, validate)
            yield CountChunk(counts=counts, gene_ids=self.gene_ids, obs=chunk_obs, start=lo)

    def obsm(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Per-cell arrays of more than one value (a loom's 2-D column attributes) of cells [start, stop)."""
        return {}

    def stored_per_cell(self, chunk_size: int = 100_000) -> np.ndarray:
        """Stored (expressed) entries of each cell, int64, without validating the counts; a format
        that keeps a row pointer answers from it without reading the counts."""
        parts = [np.diff(chunk.counts.indptr) for chunk in self.iter_chunks(chunk_size, validate=False)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _checked_counts(self, counts: sp.csr_matrix, cell_names: pd.Index, start: int, validate: bool) -> sp.csr_matrix:
        """``counts`` checked to be counts (:func:`validate_counts` when ``validate``); a failed check
        says so when the input's ``.raw`` holds integer counts, naming the option that reads them."""
        try:
            return self._count_checks(counts, cell_names, start, validate)
        except InputDataError as exc:
            note = self.count_check_note()
            if not note:
                raise
            if self.reads_raw:
                raise InputDataError(f"{exc} {note}") from exc
            return self._count_checks(counts, cell_names, start, validate, fix=note)  # fails again, with the fix

    def _count_checks(
        self, counts: sp.csr_matrix, cell_names: pd.Index, start: int, validate: bool, fix: str | None = None
    ) -> sp.csr_matrix:
        if counts.dtype == np.bool_:
            raise InputDataError(f"{self.name}: the matrix is boolean (detected / not detected), not counts; "
                                 + (fix or "read the raw UMI counts (e.g. layer='counts')."))
        if counts.dtype == np.float16:  # half precision holds counts up to 2,048 exactly; the kernels need 32 bits
            counts = counts.astype(np.float32)
        if validate:
            validate_counts(counts, allow_fractional=self.allow_fractional, start=start, cell_names=cell_names,
                            gene_ids=self.gene_ids, where=self.name, fix=fix)
        return counts

    def count_check_note(self) -> str:
        """The advice of a failed raw-count check: that this input's ``.raw`` holds integer counts and the
        option that reads them (when another matrix is read), or that ``.raw`` was read; "" if neither."""
        if self.reads_raw:
            return ("That matrix is the input's .raw (adata.raw.X), read for layer='raw': scanpy's `adata.raw = adata` "
                    "after normalize_total / log1p keeps normalized values there, not counts; read the layer that "
                    "holds the raw counts instead.")
        if self._raw_beside is None:
            return ""
        matrix, n_genes = self._raw_beside
        try:
            sample = _stored_values(matrix())
        except READ_ERRORS:
            return ""
        if not _looks_like_counts(sample):
            return ""
        return (f"its .raw (adata.raw.X, {n_genes:,} genes) holds integer counts (scanpy keeps them there after "
                "`adata.raw = adata`): read those with layer='raw' (`--layer raw` for medians / tokenize, `layer: raw` "
                "in the --tokenize-config YAML for embed / classify / perturb / predict).")


class _MatrixSource(CountSource):
    """Rows of an in-memory dense / CSR / CSC matrix (an AnnData's, a 10x mtx folder's)."""

    def __init__(self, matrix: Any, gene_ids: np.ndarray, obs: pd.DataFrame, name: str, allow_fractional: bool):
        if sp.issparse(matrix):
            # One conversion to CSR (a copy; the caller's object is never modified).
            matrix = sp.csr_matrix(matrix)
        else:
            matrix = np.asarray(matrix)
            if matrix.ndim != 2:
                raise InputDataError(f"{name}: the count matrix must be 2-D, got shape {matrix.shape}.")
        self._matrix = matrix
        self.n_cells, self.n_genes = (int(s) for s in matrix.shape)
        if len(gene_ids) != self.n_genes:
            raise InputDataError(f"{name}: {len(gene_ids)} gene IDs for {self.n_genes} matrix columns.")
        self.gene_ids = np.asarray(gene_ids).astype(str).astype(object)
        self._obs_frame = obs
        self.obs_columns = [str(c) for c in obs.columns]
        self.name = name
        self.allow_fractional = allow_fractional

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self._matrix[start:stop])

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._obs_frame.index[start:stop])

    def _obs_column(self, column: str, start: int, stop: int) -> pd.Series:
        return self._obs_frame[column].iloc[start:stop]


def _pick_gene_ids(var: pd.DataFrame, index: np.ndarray, gene_column: str | None, where: str) -> np.ndarray:
    if gene_column is None:
        return np.asarray(index).astype(str).astype(object)
    if gene_column not in var.columns:
        raise InputDataError(
            f"{where}: gene_column {gene_column!r} not found in var. Available var columns: "
            f"{sorted(map(str, var.columns))} (or leave gene_column unset to use var_names)."
        )
    return np.asarray(var[gene_column]).astype(str).astype(object)
