"""Cell and gene embeddings from a trained encoder.

The math lives in three small functions that classification and perturbation reuse:

* :func:`hidden_at_layer` runs the embeddings and only the encoder blocks needed to reach the
  requested layer (SDPA attention with a padding mask);
* :func:`pool_cells` turns per-token states into one vector per cell (mean over gene positions,
  or the ``<cls>`` state);
* :func:`embed_corpus` streams a tokenized corpus through both, in length-sorted batches with
  dynamic padding, and returns the embeddings in the corpus order.

:func:`embed_anndata` is the user API: AnnData in, ``adata.obsm[key]`` out (scverse conventions),
tokenizing on the fly with the model bundle's vocabulary and medians.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from matplotlib.backend_bases import FigureCanvasBase

from . import __version__, plots
from .bundle import load_for_inference
from .config import to_dict
from .corpus import check_corpus_vocabulary, load_corpus
from .errors import ArtifactError, ConfigError
from .fileio import atomic_file, check_outputs_of, read_h5ad, write_h5ad
from .inference import (
    CorpusEmbeddings,
    Precision,
    embed_corpus,
    encoder_of,
    layers_to_run,
)
from .model import Pooling
from .sharding import (
    DEFAULT_TIMEOUT_S,
    ShardJob,
    ShardRole,
    merge,
    plain_record,
    rank_device,
    read_rows,
    remove_shards,
    run_shard,
    shard_role,
)
from .tokenize import tokenize_for_model

if TYPE_CHECKING:  # imported lazily at run time: they pull heavy dependencies
    import anndata
    import datasets

    from .medians import GeneMedians
    from .tokenize import TokenizeConfig
    from .vocab import Vocabulary


__all__ = [
    "CorpusEmbeddings",
    "embed_anndata",
    "embed_corpus",
    "embed_corpus_folder",
    "embed_file",
    "embed_sharded",
    "embed_to_outputs",
    "merge_embed_shards",
    "write_outputs",
]


# --------------------------------------------------------------------------------------------
# The encoder math
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Corpus streaming
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# AnnData and corpus-folder front ends
# --------------------------------------------------------------------------------------------


def _check_key(adata: Any, key: str, overwrite: bool) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"key must be a non-empty string, got {key!r}")
    if key in adata.obsm and not overwrite:
        raise ConfigError(
            f"adata.obsm[{key!r}] already exists; pass overwrite=True (CLI: --overwrite) to replace it, "
            "or choose another key"
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
        ``uns[key + "_genes"]`` (index: gene token; columns ``n_cells``, ``dim_0`` ...).

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
    model, vocab, medians, tokenize_config, model_name = load_for_inference(model_or_bundle_dir, vocab, medians, tokenize_config)
    bert = encoder_of(model)
    layers_to_run(len(bert.encoder.layer), layer)
    if pooling not in ("mean", "cls"):
        raise ConfigError(f"pooling must be 'mean' or 'cls', got {pooling!r}")


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
    n_dropped = adata.n_obs - len(np.unique(rows))
    if n_dropped:
        warnings.warn(
            f"{n_dropped} of {adata.n_obs} cells were dropped by the tokenizer (no counts, no gene in the "
            f"model's vocabulary, or filter_pass=0) and were not embedded; their rows of obsm[{key!r}] are NaN. "
            f"Tokenizer report: {corpus.info.description}",
            UserWarning,
            stacklevel=2,
        )
    target = adata.copy() if copy else adata
    target.obsm[key] = out
    target.uns[f"{key}_params"] = _params_record(
        model_name, vocab, layer, pooling, hidden, n_cells=int(adata.n_obs), n_dropped=int(n_dropped),
        tokenize=to_dict(used_config),
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
    vocab: Vocabulary | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    gene_embeddings: bool | Literal["mean", "per_cell"] = False,
    progress: bool = True,
    precision: Precision = "auto",
) -> anndata.AnnData | tuple[anndata.AnnData, CorpusEmbeddings]:
    """Embed a tokenized corpus into a new AnnData (no expression matrix).

    ``obs`` holds the corpus' metadata columns (everything but ``input_ids``), ``obsm[key]`` the
    embeddings. The corpus' vocabulary hash (``mixgf_corpus.json``, when present) must match the
    model's. With ``gene_embeddings`` the :class:`CorpusEmbeddings` is returned too.
    """


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
    """Embed an ``.h5ad`` file (:func:`embed_anndata`) or a tokenized corpus folder
    (:func:`embed_corpus_folder`); returns the AnnData with ``obsm[key]`` and, with
    ``gene_embeddings``, the gene table (:func:`gene_table`). ``adata``: the file, already read.
    ``vocab`` / ``medians``: objects or paths to their files (:func:`bundle.load_for_inference`)."""
    input = Path(input)
    result = None
    if input.is_dir():
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


# long: 22 parameters of the one-process API, and the shard's compute step as a closure.
def embed_sharded(
    input: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    role: ShardRole,
    key: str = "X_mixgeneformer",
    layer: int = -2,
    pooling: str = "mean",
    batch_size: int = 32,
    device: str | None = None,
    precision: str = "auto",
    vocab: str | os.PathLike | None = None,
    medians: str | os.PathLike | None = None,
    tokenize_config: TokenizeConfig | None = None,
    gene_column: str | None = None,
    species: str = "auto",
    gene_embeddings: bool = False,
    overwrite: bool = False,
    extras: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> tuple[ad.AnnData, pd.DataFrame | None, dict[str, Any]] | None:
    """Embed this process' shard of ``input`` (an .h5ad or a corpus folder) into ``OUT.shards/``.

    Returns (adata, gene table or None, record) on the process that merges (rank 0 of a launch),
    None elsewhere; ``extras`` are recorded for the merge step (e.g. the CLI's figure options).
    """
    input, out = Path(input), Path(out)
    loaded, loaded_vocab, loaded_medians, tokenize_config, _ = load_for_inference(model, vocab, medians, tokenize_config)
    if input.is_dir():
        tokenize_config = None  # a corpus is tokenized already
        check_corpus_vocabulary(input, loaded_vocab.hash)
    tokens_ids = {t: i for i, t in enumerate(loaded_vocab.tokens)}
    device = rank_device(device)

    def compute(start: int, stop: int) -> dict[str, np.ndarray]:
        if input.is_dir():
            dataset = load_corpus(input).select(range(start, stop))
            produced = embed_corpus_folder(
                dataset, loaded, key=key, layer=layer, pooling=pooling, vocab=loaded_vocab, batch_size=batch_size,
                device=device, gene_embeddings=gene_embeddings, progress=progress, precision=precision,
            )
            part, result = produced if isinstance(produced, tuple) else (produced, None)
            part.uns[f"{key}_params"]["corpus"] = str(input)
            genes = gene_table(result) if result is not None else None
        else:
            part = read_rows(input, start, stop)
            embed_anndata(
                part, loaded, key=key, layer=layer, pooling=pooling, overwrite=overwrite, gene_column=gene_column,
                species=species, vocab=loaded_vocab, medians=loaded_medians, tokenize_config=tokenize_config,
                batch_size=batch_size, device=device, progress=progress, precision=precision,
                gene_embeddings=gene_embeddings,
            )
            genes = part.uns.pop(f"{key}_genes", None)
        arrays = {"values": np.asarray(part.obsm[key], dtype=np.float32),
                  "params": np.array(json.dumps(plain_record(part.uns[f"{key}_params"])))}
        if genes is not None:
            arrays.update(gene_ids=np.asarray([tokens_ids[g] for g in genes.index], dtype=np.int64),
                          gene_names=np.asarray(genes.index, dtype=str),
                          gene_counts=genes["n_cells"].to_numpy(np.int64),
                          gene_means=genes.drop(columns="n_cells").to_numpy(np.float32))
        return arrays

    options = {"layer": int(layer), "pooling": pooling, "precision": precision, "gene_column": gene_column,
               "species": species, "gene_embeddings": bool(gene_embeddings),
               "tokenize": to_dict(tokenize_config) if tokenize_config is not None else None}
    sources = [p for p in (input, Path(model), vocab and Path(vocab), medians and Path(medians)) if p]
    job = ShardJob("embed", input, out, sources, options,
               {"key": key, "model": str(model), **(extras or {})}, tokenize_config)
    if not run_shard(job, role, compute, timeout_s, echo):
        return None
    _, record, adata, genes = merge(out)
    return adata, genes, record


def check_outputs(
    out: Path, gene_embeddings: Path | None, umap: Path | None, inputs: list[str | os.PathLike | None], overwrite: bool
) -> None:
    """Every output of an embedding run is valid, distinct and replaces no input (before any work)."""
    figures = {f".{s}" for s in FigureCanvasBase.get_supported_filetypes()}
    check_outputs_of({"--out": (out, {".h5ad"}), "--gene-embeddings": (gene_embeddings, {".parquet"}),
                      "--umap": (umap, figures)}, inputs, overwrite)


def _read_checked(input: Path, color: str | None, backed: bool) -> anndata.AnnData | None:
    """The input (h5ad: the AnnData, read once, backed when ``backed``; corpus: None) after checking
    ``color`` is one of its columns."""
    if input.is_dir():
        columns = [c for c in load_corpus(input).column_names if c != "input_ids"]
        adata = None
    else:
        adata = read_h5ad(input, "input h5ad", backed="r" if backed else None)
        columns = list(adata.obs.columns)
    if color is not None and color not in columns:
        raise ConfigError(f"--color {color!r} is not a column of {input}; available: {columns}")
    return adata


# long: every option is checked before the model loads, then one of two runs (sharded or not).
def embed_to_outputs(
    input: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    key: str = "X_mixgeneformer",
    layer: int = -2,
    pooling: Pooling = "mean",
    gene_embeddings: str | os.PathLike | None = None,
    umap: str | os.PathLike | None = None,
    color: str | None = None,
    vocab: str | os.PathLike | None = None,
    medians: str | os.PathLike | None = None,
    tokenize_config: TokenizeConfig | None = None,
    gene_column: str | None = None,
    species: str = "auto",
    batch_size: int = 32,
    device: str | None = None,
    precision: Precision = "auto",
    overwrite: bool = False,
    progress: bool = True,
    shard_index: int | None = None,
    num_shards: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    echo: Callable[[str], None] = print,
    config_files: Sequence[str | os.PathLike | None] = (),
) -> tuple[anndata.AnnData, pd.DataFrame | None] | None:
    """``mixgf embed``: check every option and output first, then embed ``input`` in one process
    (:func:`embed_file`) or this process' shard (:func:`embed_sharded`, under ``torchrun`` or with
    ``shard_index`` / ``num_shards``). Returns (adata, gene table or None) for
    :func:`write_outputs` on the process that writes; None on the others. ``config_files``: other
    files the run read (e.g. the ``--tokenize-config`` YAML), which no output may replace."""
    input, out = Path(input), Path(out)
    gene_path = None if gene_embeddings is None else Path(gene_embeddings)
    umap = None if umap is None else Path(umap)
    if color is not None and umap is None:
        raise ConfigError("--color only applies to --umap FIG.png; add --umap")
    check_outputs(out, gene_path, umap, [input, model, vocab, medians, *config_files], overwrite)
    if not input.exists():
        raise ArtifactError(f"input {input} does not exist; give an .h5ad file or a tokenized corpus folder")
    role = shard_role(shard_index, num_shards)
    adata = _read_checked(input, color, backed=role.world > 1)
    if role.world == 1:
        return embed_file(
            input, model, key=key, layer=layer, pooling=pooling, overwrite=overwrite, gene_column=gene_column,
            species=species, vocab=vocab, medians=medians, tokenize_config=tokenize_config, batch_size=batch_size,
            device=device, progress=progress, precision=precision, gene_embeddings=gene_path is not None, adata=adata,
        )
    if adata is not None:
        adata.file.close()
    merged = embed_sharded(
        input, model, out, role=role, key=key, layer=layer, pooling=pooling, batch_size=batch_size, device=device,
        precision=precision, vocab=vocab, medians=medians, tokenize_config=None if input.is_dir() else tokenize_config,
        gene_column=gene_column, species=species, gene_embeddings=gene_path is not None, progress=progress,
        overwrite=overwrite, timeout_s=timeout_s, echo=echo,
        extras={"gene_embeddings": None if gene_path is None else str(gene_path),
                "umap": None if umap is None else str(umap), "color": color, "overwrite": overwrite},
    )
    return None if merged is None else (merged[0], merged[1])


def write_outputs(
    adata: anndata.AnnData, genes: pd.DataFrame | None, out: str | os.PathLike, key: str,
    gene_embeddings: str | os.PathLike | None = None, umap: str | os.PathLike | None = None, color: str | None = None,
    keep_shards: bool = False,
) -> list[str]:
    """Write OUT.h5ad, then the gene table and the UMAP figure when asked for; drop OUT.shards/
    (unless ``keep_shards``). Returns one line per file written."""
    write_h5ad(adata, out)
    written = [f"wrote {out}: obsm[{key!r}] {adata.obsm[key].shape}"]
    if genes is not None and gene_embeddings is not None:
        with atomic_file(gene_embeddings, "wb") as handle:
            genes.to_parquet(handle)
        written.append(f"wrote {gene_embeddings}: {len(genes):,} genes x {genes.shape[1] - 1} dims")
    if umap is not None:
        plots.umap(adata, color=color, key=key, save=umap)
        written.append(f"wrote {umap}")
    if not keep_shards:
        remove_shards(out)
    return written


def merge_embed_shards(out: str | os.PathLike, keep_shards: bool = False) -> list[str]:
    """``mixgf embed-merge``: the shards of a sharded embedding run merged into OUT (input obs order)
    and its other outputs written; returns one line per file written."""
    kind, record, adata, genes = merge(out)
    if kind != "embed":
        raise ConfigError(f"{out}.shards holds {kind} shards; use mixgf {kind}-merge")
    optional = {name: Path(record[name]) if record.get(name) else None for name in ("gene_embeddings", "umap")}
    return write_outputs(adata, genes, out, record["key"], optional["gene_embeddings"], optional["umap"],
                         record.get("color"), keep_shards=keep_shards)
