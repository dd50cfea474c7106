"""Whole AnnData objects from any count input, for the commands that run a model on cells (embed,
predict, classify, perturb): :func:`read_anndata` reads an ``.h5ad`` as it always has
(:func:`fileio.read_h5ad`, or :func:`read_rows` for a shard's cells) and every other format
:func:`open_source` accepts (``.loom``, 10x ``.h5``, a 10x ``matrix.mtx`` folder, a TileDB-SOMA
experiment) through its :class:`CountSource`, row chunk by row chunk.

An AnnData read from another format is shaped so that the reader options it was read with read it
again the same way: raw counts (CSR) in ``X`` and, with ``layer``, the same matrix in
``layers[layer]``; the input's gene identifiers as ``var_names`` and, with ``gene_column``, in
``var[gene_column]``; the input's obs (cell names and every column). So a tokenize configuration
that names a layer or a gene column tokenizes it as it tokenizes the input file itself.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ArtifactError, InputDataError
from ..fileio import check_readable_file, h5ad_read_errors, read_h5ad, remember_source
from .formats import _find_one, open_source
from .options import ReadOptions
from .soma import _is_soma

H5AD = "h5ad"
#: what :func:`count_format` answers for the inputs read through a CountSource
OTHER_FORMATS = ("loom", "10x_h5", "10x_mtx", "soma")
#: the count inputs the model commands read, for messages and help texts
COUNT_INPUTS = "an .h5ad, .loom or 10x .h5 file, a 10x matrix.mtx folder or a TileDB-SOMA experiment"
_CHUNK = 10_000


def count_format(path: str | os.PathLike) -> str | None:
    """Which reader reads ``path``: ``"h5ad"`` (any file not of another format, read by anndata as
    before), ``"loom"``, ``"10x_h5"`` (an ``.h5`` not laid out as an AnnData), ``"10x_mtx"`` (a folder
    holding ``matrix.mtx[.gz]``), ``"soma"`` (a TileDB-SOMA experiment folder), or None for any other
    folder (a tokenized corpus, or nothing readable)."""
    path = Path(path)
    if path.is_dir():
        if _is_soma(path):
            return "soma"
        return "10x_mtx" if _find_one(path, ["matrix.mtx"]) is not None else None
    name = path.name.lower()
    if name.endswith(".loom"):
        return "loom"
    if name.endswith(".h5"):
        try:
            with h5py.File(path, "r") as f:
                return H5AD if "X" in f or ("obs" in f and "var" in f) else "10x_h5"
        except OSError:
            return "10x_h5"  # open_source says what is wrong with it
    return H5AD


# long: a 30-line docstring; the body reads the rows chunk by chunk and shapes the AnnData.
def read_anndata(
    path: str | os.PathLike,
    rows: tuple[int, int] | None = None,
    *,
    layer: str | None = None,
    gene_column: str | None = None,
    allow_fractional: bool = False,
    measurement: str = "RNA",
    obs_filter: str | None = None,
    chunk_size: int = _CHUNK,
) -> ad.AnnData:
    """The cells of any count input as an in-memory AnnData.

    Parameters
    ----------
    path
        An ``.h5ad``: read with :func:`fileio.read_h5ad` (``rows``: :func:`read_rows`), exactly as
        before; the read options below are then left to the tokenizer, which applies them to the
        AnnData. Any other input :func:`open_source` reads (``.loom``, 10x ``.h5``, a 10x
        ``matrix.mtx`` folder, a TileDB-SOMA experiment): read with the options below, ``chunk_size``
        cells at a time, into raw counts (CSR) in ``X`` (and ``layers[layer]``), the gene
        identifiers as ``var_names`` (and in ``var[gene_column]``) and the input's obs.
    rows
        Read only cells ``[start, stop)`` (a shard of a sharded run); default every cell.
    layer, gene_column, allow_fractional, measurement, obs_filter
        As for :func:`open_source` (``obs_filter``: a SOMA experiment's cells to read).
    chunk_size
        Cells read per chunk (bounds the reading buffers; the result holds every cell asked for).

    Returns
    -------
    anndata.AnnData
        In the input's cell order; the counts are validated (raw counts unless ``allow_fractional``).
    """
    if count_format(path) == H5AD:
        return read_h5ad(path, "input h5ad") if rows is None else read_rows(Path(path), *rows)
    with open_source(path, layer, gene_column, allow_fractional=allow_fractional, measurement=measurement,
                     obs_filter=obs_filter, cells=rows) as source:  # cells: a 10x mtx folder keeps only those
        start, stop = (0, source.n_cells) if rows is None else (max(0, rows[0]), min(rows[1], source.n_cells))
        counts, frames = [], []
        for chunk in source.iter_chunks(chunk_size, obs_columns=source.obs_columns, start=start, stop=stop):
            counts.append(chunk.counts)
            frames.append(chunk.obs)
        gene_ids = np.asarray(source.gene_ids).astype(str)
        obsm = source.obsm(start, stop)
    matrix = sp.vstack(counts, format="csr") if counts else sp.csr_matrix((0, gene_ids.size), dtype=np.float32)
    obs = _nullable_columns(pd.concat(frames)) if frames else pd.DataFrame(index=pd.Index([], dtype=object))
    var = pd.DataFrame(index=pd.Index(gene_ids, dtype=object))
    if gene_column is not None:
        var[gene_column] = gene_ids
    adata = ad.AnnData(X=matrix, obs=obs, var=var, obsm=obsm or None)
    if layer is not None:
        adata.layers[layer] = adata.X  # the same matrix: read under the layer's name as from the input
    return remember_source(adata, path)


#: object columns whose values (missing ones aside) are all of one of these kinds: their nullable pandas dtype
_NULLABLE = {"boolean": "boolean", "integer": "Int64"}


def _nullable_columns(obs: pd.DataFrame) -> pd.DataFrame:
    """``obs`` with each object column of booleans or integers and missing values (a TileDB-SOMA nullable
    ``bool`` / ``int`` column reads as Python objects, True / None) as pandas' nullable dtype, which an
    h5ad stores; as objects, anndata cannot write them and the output failed after all the work."""
    for column in obs.columns[[dtype == np.dtype(object) for dtype in obs.dtypes]]:
        kind = pd.api.types.infer_dtype(obs[column], skipna=True)
        if kind in _NULLABLE and obs[column].isna().any():
            obs[column] = obs[column].astype(_NULLABLE[kind])
    return obs


def read_cells(path: str | os.PathLike, options: ReadOptions | None = None, rows: tuple[int, int] | None = None,
               gene_column: str | None = None) -> ad.AnnData:
    """:func:`read_anndata` with the reader options of a tokenize configuration (``TokenizeConfig.read_options``;
    default ones for None); ``gene_column``, when given, replaces theirs (``mixgf embed --gene-column``)."""
    options = options or ReadOptions()
    return read_anndata(path, rows, layer=options.layer, gene_column=gene_column or options.gene_column,
                        allow_fractional=options.allow_fractional, measurement=options.measurement,
                        obs_filter=options.obs_filter, chunk_size=options.chunk_size)


def input_obs(path: str | os.PathLike, options: ReadOptions | None = None,
              gene_column: str | None = None) -> tuple[int, list[str], list[str]]:
    """(number of cells, obs columns, obsm keys) of a count input other than an ``.h5ad``, read without its
    counts; ``gene_column``, when given, replaces the options' (as in :func:`read_cells`: a loom without a
    default gene attribute opens only with it)."""
    options = options or ReadOptions()
    if gene_column is not None:
        options = dataclasses.replace(options, gene_column=gene_column)
    with options.open(path) as source:
        return source.n_cells, [str(c) for c in source.obs_columns], list(source.obsm(0, 0))


def read_rows(input: Path, start: int, stop: int) -> ad.AnnData:
    """Cells ``start:stop`` of an h5ad, read as row slices of the backed file. An h5ad without X (its
    counts in a layer) is read whole and sliced: anndata's backed mode keeps only X on disk (it reads
    the layers whole anyway) and cannot slice a file without one."""
    check_readable_file(input, "input h5ad")
    errors = h5ad_read_errors()
    try:
        backed = ad.read_h5ad(input, backed="r")
    except errors as exc:
        raise ArtifactError(f"cannot read {input} as h5ad ({exc}); is it truncated or another format?") from exc
    try:
        if _null_raw(backed):
            del backed.raw  # a null ``raw`` (earlier versions of this package wrote one): anndata cannot slice it
        if "X" not in backed.file:
            backed.file.close()
            return remember_source(read_h5ad(input, "input h5ad")[start:stop].copy(), input)
        return remember_source(backed[start:stop].to_memory(), input)
    except (AttributeError, *errors) as exc:
        raise ArtifactError(
            f"cannot read cells {start}-{stop} of {input} from the backed file ({type(exc).__name__}: {exc}); rewrite it "
            "with anndata (ad.read_h5ad(path).write_h5ad(new_path)) and pass the new file"
        ) from exc
    finally:
        backed.file.close()


def _null_raw(backed: ad.AnnData) -> bool:
    """Whether a backed h5ad stores ``raw`` as a null element (no raw/X): older versions of this package wrote that."""
    try:
        return backed.file["raw"].attrs.get("encoding-type") == "null"
    except (KeyError, AttributeError, TypeError):
        return False


def refused_folder(path: Path, option: str, corpus: bool) -> InputDataError:
    """The error for a folder a model command cannot read (``corpus``: the command reads tokenized corpora too)."""
    kinds = ("a tokenized corpus (mixgf tokenize), " if corpus else "") + "a 10x matrix.mtx folder nor a TileDB-SOMA experiment"
    reads = COUNT_INPUTS + (", or a tokenized corpus folder" if corpus else "")
    return InputDataError(f"{option} {path} is a folder but neither {kinds}; this command reads {reads}.")
