"""Embedding in this process: an AnnData (:func:`embed_anndata`, tokenized on the fly), a corpus folder
(:func:`embed_corpus_folder`) or either from a path (:func:`embed_file`), all on
:func:`mixgeneformer.inference.embed_corpus`; :func:`gene_table` for the gene embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..bundle import load_for_inference
from ..config import to_dict
from ..corpus import check_corpus_vocabulary, load_corpus
from ..devices import Precision, precision_in_use
from ..errors import ConfigError
from ..fileio import read_h5ad
from ..inference import (
    CorpusEmbeddings,
    check_embed_options,
    check_output_key,
    embed_corpus,
    encoder_of,
    layers_to_run,
)
from ..model import Pooling
from ..readers.cells import H5AD, count_format, read_cells
from ..sharding import cells_tokenize_config, model_tokenize_config
from ..tokenize import species_counts, tokenize_for_model, warn_dropped

if TYPE_CHECKING:  # imported lazily at run time: they pull heavy dependencies
    import anndata
    import datasets

    from ..medians import GeneMedians
    from ..tokenize import TokenizeConfig
    from ..vocab import Vocabulary


def _check_key(adata: Any, key: str, overwrite: bool) -> None:
    check_output_key(key)
    if key in adata.obsm and not overwrite:
        raise ConfigError(
            f"adata.obsm[{key!r}] already exists; pass overwrite=True (CLI: --overwrite) to replace it, "
            "or choose another key (CLI: --key)"
        )


def _check_writable(adata: Any, copy: bool) -> None:
    """anndata cannot copy a backed AnnData nor write into a view of one: refused before any work."""
    if not getattr(adata, "isbacked", False):
        return
    if adata.is_view:
        raise ConfigError(
            f"adata is a view of the backed file {adata.filename}, and anndata cannot write the embedding into it; "
            "read the view into memory first (adata[...].to_memory() reads only its cells)."
        )
    if copy:
        raise ConfigError(
            f"copy=True cannot copy the backed AnnData {adata.filename} (anndata copies backed objects only to a "
            "new file); pass copy=False (obsm is written in memory, the file is untouched) or read it into "
            "memory first (adata.to_memory())."
        )


def _params_record(model_name: str, vocab: Vocabulary, layer: int, pooling: str, hidden: int, **extra: Any) -> dict:
    record = {
        "model": model_name,
        "vocab_hash": vocab.hash,
        "layer": int(layer),
        "pooling": pooling,
        "hidden_size": int(hidden),
        "mixgeneformer_version": __version__,
        **extra,
    }
    return _without_none(record)


def _without_none(value: Any) -> Any:
    """h5ad cannot store None in ``uns``: drop such entries (absent = not set)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


# long: a 43-line docstring; the body (40 lines) is validate, tokenize, embed, write back.
def embed_anndata(
    adata: anndata.AnnData,
    model_or_bundle_dir: str | os.PathLike | torch.nn.Module,
    key: str = "X_mixgeneformer",
    layer: int = -2,
    pooling: Pooling = "mean",
    overwrite: bool = False,
    gene_column: str | None = None,
    species: str = "auto",
    copy: bool = False,
    *,
    vocab: Vocabulary | str | os.PathLike | None = None,
    medians: GeneMedians | str | os.PathLike | None = None,
    tokenize_config: TokenizeConfig | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    precision: Precision = "auto",
    gene_embeddings: bool = False,
) -> anndata.AnnData | None:
    """Embed the cells of an AnnData into ``adata.obsm[key]``.

    The raw counts are tokenized on the fly with the model's vocabulary and gene medians (those
    of the bundle unless given), then embedded with :func:`embed_corpus`.

    Parameters
    ----------
    adata
        Cells x genes with raw counts (``X`` or as the tokenizer is configured). Not modified
        when ``copy=True``.
    model_or_bundle_dir
        A model bundle folder (``bundle.save_bundle``) or an in-memory model (then ``vocab`` and
        ``medians`` are required).
    key
        ``obsm`` key to write.
    layer, pooling
        As in :func:`embed_corpus`.
    overwrite
        Replace an existing ``obsm[key]``; otherwise that is an error raised before any work.
    gene_column
        ``var`` column holding gene IDs or symbols (default: ``var_names``).
    species
        ``"human"``, ``"mouse"`` or ``"auto"`` (detected from the gene IDs).
    copy
        Return an embedded copy instead of writing into ``adata``.
    vocab, medians
        Override / supply the vocabulary and gene medians (objects or paths to their files).
    tokenize_config
        A :class:`mixgeneformer.tokenize.TokenizeConfig`; its ``max_len`` is capped at the
        model's ``max_position_embeddings``.
    batch_size, device, progress, precision
        As in :func:`embed_corpus`.
    gene_embeddings
        Also store each gene's mean contextual embedding over the cells as a DataFrame in
        ``uns[key + "_genes"]`` (index: gene token; columns ``n_cells``, ``dim_0`` ...). A gene is
        averaged over the cells whose tokens hold it (among the top ``max_len`` ranked genes), and
        ``n_cells`` counts those cells, not every cell that expresses the gene.

    Returns
    -------
    AnnData or None
        The copy when ``copy=True``, else None. ``obsm[key]`` is (n_obs, hidden) float32 in obs
        order; cells the tokenizer dropped (no vocabulary gene) are NaN rows, with a warning.
        ``uns[key + "_params"]`` records how the embedding was made.
    """
    if not hasattr(adata, "obsm") or not hasattr(adata, "obs"):
        raise ConfigError(f"adata must be an AnnData, got {type(adata).__name__}")
    _check_key(adata, key, overwrite)
    _check_writable(adata, copy)
    if not isinstance(gene_embeddings, (bool, np.bool_)):
        raise ConfigError(f"gene_embeddings must be True or False, got {gene_embeddings!r}")
    check_embed_options(pooling, batch_size, precision, device)  # before any work
    model, vocab, medians, tokenize_config, model_name = load_for_inference(model_or_bundle_dir, vocab, medians, tokenize_config)
    bert = encoder_of(model)
    layers_to_run(len(bert.encoder.layer), layer)

    corpus, rows, used_config = tokenize_for_model(
        adata, vocab, medians, tokenize_config, int(bert.config.max_position_embeddings),
        gene_column=gene_column, species=species,
    )
    result = embed_corpus(
        model, corpus, vocab, layer=layer, pooling=pooling, batch_size=batch_size, device=device,
        progress=progress, precision=precision, gene_embeddings=bool(gene_embeddings),
    )
    cells = result.cells if isinstance(result, CorpusEmbeddings) else result
    hidden = cells.shape[1]
    out = np.full((adata.n_obs, hidden), np.nan, dtype=np.float32)
    out[rows] = cells
    n_dropped = warn_dropped(adata.n_obs, rows, corpus, f"were not embedded; their rows of obsm[{key!r}] are NaN")
    target = adata.copy() if copy else adata
    target.obsm[key] = out
    target.uns[f"{key}_params"] = _params_record(
        model_name, vocab, layer, pooling, hidden, n_cells=int(adata.n_obs), n_dropped=int(n_dropped),
        tokenize=to_dict(used_config), precision=precision_in_use(device, precision), species=species_counts(corpus),
    )
    if isinstance(result, CorpusEmbeddings):
        target.uns[f"{key}_genes"] = gene_table(result)
    return target if copy else None


def gene_table(result: CorpusEmbeddings) -> pd.DataFrame:
    """The gene embeddings of ``result`` with their cell counts as a first ``n_cells`` column."""
    table = result.genes.copy()
    table.insert(0, "n_cells", result.gene_counts.to_numpy())
    return table


def embed_corpus_folder(
    corpus: str | os.PathLike | datasets.Dataset,
    model_or_bundle_dir: str | os.PathLike | torch.nn.Module,
    key: str = "X_mixgeneformer",
    layer: int = -2,
    pooling: Pooling = "mean",
    *,
    vocab: Vocabulary | str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    gene_embeddings: bool | Literal["mean", "per_cell"] = False,
    progress: bool = True,
    precision: Precision = "auto",
) -> anndata.AnnData | tuple[anndata.AnnData, CorpusEmbeddings]:
    """Embed a tokenized corpus into a new AnnData (no expression matrix).

    ``corpus`` is a corpus folder (``mixgf tokenize``) or an in-memory :class:`datasets.Dataset`;
    ``model_or_bundle_dir`` and ``vocab`` (object or path; required with a loaded model) as in
    :func:`embed_anndata`; ``layer``, ``pooling``, ``batch_size``, ``device``, ``gene_embeddings``
    (``True`` / ``"mean"`` / ``"per_cell"``), ``progress`` and ``precision`` as in :func:`embed_corpus`.
    ``obs`` holds the corpus' metadata columns (everything but ``input_ids``; index ``"0"``, ``"1"``
    ... in corpus order), ``obsm[key]`` the embeddings and ``uns[key + "_params"]`` how they were
    made. The corpus' vocabulary hash (``mixgf_corpus.json``, when present) must match the model's.
    With ``gene_embeddings`` the :class:`CorpusEmbeddings` is returned too: ``(adata, embeddings)``.
    """
    check_output_key(key)
    model, vocab, _, _, model_name = load_for_inference(model_or_bundle_dir, vocab, None)
    if isinstance(corpus, (str, os.PathLike)):
        check_corpus_vocabulary(corpus, vocab.hash)
        dataset = load_corpus(corpus)
    else:
        dataset = corpus
    result = embed_corpus(
        model, dataset, vocab, layer=layer, pooling=pooling, batch_size=batch_size, device=device,
        gene_embeddings=gene_embeddings, progress=progress, precision=precision,
    )
    cells = result.cells if isinstance(result, CorpusEmbeddings) else result
    meta = [c for c in dataset.column_names if c != "input_ids"]
    obs = dataset.select_columns(meta).to_pandas() if meta else pd.DataFrame(index=range(len(cells)))
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(obs=obs)
    adata.obsm[key] = cells
    adata.uns[f"{key}_params"] = _params_record(
        model_name, vocab, layer, pooling, cells.shape[1], n_cells=len(cells), n_dropped=0,
        precision=precision_in_use(device, precision),
        corpus=str(corpus) if isinstance(corpus, (str, os.PathLike)) else "in-memory",
    )
    if isinstance(result, CorpusEmbeddings):
        return adata, result
    return adata


def embed_file(
    input: str | os.PathLike,
    model_or_bundle_dir: str | os.PathLike | torch.nn.Module,
    key: str = "X_mixgeneformer",
    layer: int = -2,
    pooling: Pooling = "mean",
    overwrite: bool = False,
    gene_column: str | None = None,
    species: str = "auto",
    *,
    vocab: Vocabulary | str | os.PathLike | None = None,
    medians: GeneMedians | str | os.PathLike | None = None,
    tokenize_config: TokenizeConfig | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    precision: Precision = "auto",
    gene_embeddings: bool = False,
    adata: anndata.AnnData | None = None,
) -> tuple[anndata.AnnData, pd.DataFrame | None]:
    """Embed a count input (:func:`embed_anndata`: an ``.h5ad``, ``.loom`` or 10x ``.h5`` file, a 10x
    ``matrix.mtx`` folder or a TileDB-SOMA experiment, read by :func:`readers.cells.read_cells` with the
    tokenize options' reader options) or a tokenized corpus folder (:func:`embed_corpus_folder`); returns
    the AnnData (the input's cells and obs) with ``obsm[key]`` and, with ``gene_embeddings``, the gene
    table (:func:`gene_table`). ``adata``: the input, already read. ``vocab`` / ``medians``: objects or
    paths to their files (:func:`bundle.load_for_inference`)."""
    input = Path(input)
    result = None
    kind = count_format(input)
    if kind not in (None, H5AD):  # read with the options it is tokenized with; their obs_filter is applied here
        config = model_tokenize_config(model_or_bundle_dir, tokenize_config)
        adata = adata if adata is not None else read_cells(input, config and config.read_options, gene_column=gene_column)
        tokenize_config = cells_tokenize_config(input, config)
    if kind is None:
        produced = embed_corpus_folder(
            input, model_or_bundle_dir, key=key, layer=layer, pooling=pooling, vocab=vocab, batch_size=batch_size,
            device=device, gene_embeddings=gene_embeddings, progress=progress, precision=precision,
        )
        adata, result = produced if isinstance(produced, tuple) else (produced, None)
    else:
        adata = adata if adata is not None else read_h5ad(input, "input h5ad")
        embed_anndata(
            adata, model_or_bundle_dir, key=key, layer=layer, pooling=pooling, overwrite=overwrite, gene_column=gene_column,
            species=species, vocab=vocab, medians=medians, tokenize_config=tokenize_config, batch_size=batch_size,
            device=device, progress=progress, precision=precision, gene_embeddings=gene_embeddings,
        )
    genes = None
    if gene_embeddings:
        genes = gene_table(result) if result is not None else adata.uns.pop(f"{key}_genes")
    return adata, genes
