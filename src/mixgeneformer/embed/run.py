"""``mixgf embed`` and ``mixgf embed-merge``: every option and output checked first
(:func:`embed_to_outputs`), then one process (:func:`mixgeneformer.embed.cells.embed_file`) or this
process' shard (:func:`embed_sharded`, on :func:`mixgeneformer.sharding.run_shard`); the outputs
written by :func:`write_outputs`, sharded runs merged by :func:`merge_embed_shards`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .. import plots
from ..bundle import load_for_inference
from ..config import to_dict
from ..corpus import check_corpus_vocabulary, load_corpus, refuse_tokenize_options
from ..devices import Precision, resolve_device
from ..errors import ArtifactError, ConfigError, InputDataError
from ..fileio import (
    atomic_file,
    check_outputs_of,
    output_lock,
    read_h5ad,
    write_h5ad,
    written_together,
)
from ..filekinds import STAMPED_FIGURES, parquet_table
from ..inference import check_embed_options, check_output_key, encoder_of
from ..model import Pooling
from ..readers import ReadOptions
from ..readers.cells import COUNT_INPUTS, H5AD, count_format, input_obs, read_cells
from ..sharding import (
    DEFAULT_TIMEOUT_S,
    ShardJob,
    ShardRole,
    cells_tokenize_config,
    merge,
    model_tokenize_config,
    plain_record,
    rank_device,
    remove_shards,
    run_shard,
    shard_role,
    untokenized_shard,
)
from .cells import embed_anndata, embed_corpus_folder, embed_file, gene_table

if TYPE_CHECKING:
    import anndata

    from ..tokenize import TokenizeConfig


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
    """Embed this process' shard of ``input`` (a count input :func:`readers.cells.read_anndata` reads, or a
    corpus folder) into ``OUT.shards/``.

    Returns (adata, gene table or None, record) on the process that merges (rank 0 of a launch),
    None elsewhere; ``extras`` are recorded for the merge step (e.g. the CLI's figure options).
    """
    input, out = Path(input), Path(out)
    check_output_key(key)  # before the model loads, on every rank
    device = rank_device(device)
    resolve_device(device)
    loaded, loaded_vocab, loaded_medians, tokenize_config, _ = load_for_inference(model, vocab, medians, tokenize_config)
    corpus = count_format(input) is None
    if corpus:
        tokenize_config = None  # a corpus is tokenized already
        check_corpus_vocabulary(input, loaded_vocab.hash)
    tokens_ids = {t: i for i, t in enumerate(loaded_vocab.tokens)}
    read = tokenize_config.read_options if tokenize_config is not None else None
    cells_config = cells_tokenize_config(input, tokenize_config)

    def compute(start: int, stop: int) -> dict[str, np.ndarray]:
        if corpus:
            dataset = load_corpus(input).select(range(start, stop))
            produced = embed_corpus_folder(
                dataset, loaded, key=key, layer=layer, pooling=pooling, vocab=loaded_vocab, batch_size=batch_size,
                device=device, gene_embeddings=gene_embeddings, progress=progress, precision=precision,
            )
            part, result = produced if isinstance(produced, tuple) else (produced, None)
            part.uns[f"{key}_params"]["corpus"] = str(input)
            genes = gene_table(result) if result is not None else None
        else:
            part = _embed_rows(
                read_cells(input, read, (start, stop), gene_column), loaded, key, layer=layer, pooling=pooling,
                overwrite=overwrite, gene_column=gene_column, species=species, vocab=loaded_vocab, medians=loaded_medians,
                tokenize_config=cells_config, batch_size=batch_size, device=device, progress=progress,
                precision=precision, gene_embeddings=gene_embeddings,
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


def _embed_rows(part: anndata.AnnData, model: Any, key: str, **options: Any) -> anndata.AnnData:
    """:func:`embed_anndata` of one shard's cells. A shard none of whose cells the tokenizer keeps
    gets NaN rows, as those cells get in a one-process run (the merge refuses an input without any
    tokenizable cell, as a one-process run does)."""
    try:
        embed_anndata(part, model, key=key, **options)
    except InputDataError as exc:
        if not untokenized_shard(exc, part.n_obs, f"their rows of obsm[{key!r}]"):
            raise
        hidden = int(encoder_of(model).config.hidden_size)
        part.obsm[key] = np.full((part.n_obs, hidden), np.nan, dtype=np.float32)
        part.uns[f"{key}_params"] = {"n_cells": int(part.n_obs), "n_dropped": int(part.n_obs)}
    return part


def check_outputs(
    out: Path, gene_embeddings: Path | None, umap: Path | None, inputs: list[str | os.PathLike | None], overwrite: bool
) -> None:
    """Every output of an embedding run is valid, distinct and replaces no input (before any work)."""
    figures = {f".{s}" for s in STAMPED_FIGURES}  # formats that carry the stamp --overwrite asks for
    check_outputs_of({"--out": (out, {".h5ad"}), "--gene-embeddings": (gene_embeddings, {".parquet"}),
                      "--umap": (umap, figures)}, inputs, overwrite)


def _read_checked(input: Path, color: str | None, backed: bool, umap: Path | None = None,
                  read: ReadOptions | None = None, gene_column: str | None = None) -> anndata.AnnData | None:
    """The input (an h5ad: the AnnData, read once, backed when ``backed``; another count input: read with
    the reader options ``read`` unless ``backed``, else only its obs columns; corpus: None) after checking
    ``color`` is one of its columns and, with ``umap``, that it has the cells a UMAP needs."""
    kind, adata = count_format(input), None
    if kind is None:
        corpus = load_corpus(input)
        columns, n_cells = [c for c in corpus.column_names if c != "input_ids"], len(corpus)
    elif kind == H5AD or not backed:
        adata = (read_h5ad(input, "input h5ad", backed="r" if backed else None) if kind == H5AD
                 else read_cells(input, read, gene_column=gene_column))
        columns, n_cells = list(adata.obs.columns), adata.n_obs
    else:
        n_cells, columns, _ = input_obs(input, read, gene_column)
    if color is not None and color not in columns:
        raise ConfigError(f"--color {color!r} is not a column of {input}; available: {columns}")
    if umap is not None and n_cells < plots.MIN_UMAP_CELLS:  # else the figure fails after the embedding
        raise ConfigError(f"--umap needs at least {plots.MIN_UMAP_CELLS} cells; {input} has {n_cells}. Leave out --umap")
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
    check_embed_options(pooling, batch_size, precision, rank_device(device))  # this rank's device, before any work
    corpus = input.exists() and count_format(input) is None
    if corpus:
        refuse_tokenize_options(input, "embed", tokenize_config=tokenize_config, gene_column=gene_column, species=species)
    check_outputs(out, gene_path, umap, [input, model, vocab, medians, *config_files], overwrite)
    if not input.exists():
        raise ArtifactError(f"input {input} does not exist; give {COUNT_INPUTS}, or a tokenized corpus folder")
    role = shard_role(shard_index, num_shards)
    other = not corpus and count_format(input) != H5AD  # read with the reader options it is tokenized with
    read = model_tokenize_config(model, tokenize_config) if other else None
    adata = _read_checked(input, color, role.world > 1, umap, read and read.read_options, gene_column)
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
        precision=precision, vocab=vocab, medians=medians, tokenize_config=None if corpus else tokenize_config,
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
    """Write OUT.h5ad, the gene table and the UMAP figure when asked for, all or none (a failure of
    the last keeps every earlier file as it was); drop OUT.shards/ (unless ``keep_shards``).
    Returns one line per file written."""
    with written_together():
        write_h5ad(adata, out)
        written = [f"wrote {out}: obsm[{key!r}] {adata.obsm[key].shape}"]
        if genes is not None and gene_embeddings is not None:
            with atomic_file(gene_embeddings, "wb") as handle:
                pq.write_table(parquet_table(genes), handle)
            written.append(f"wrote {gene_embeddings}: {len(genes):,} genes x {genes.shape[1] - 1} dims")
        if umap is not None:
            plots.umap(adata, color=color, key=key, save=umap)
            written.append(f"wrote {umap}")
    if not keep_shards:
        remove_shards(out)
    return written


def merge_embed_shards(out: str | os.PathLike, keep_shards: bool = False) -> list[str]:
    """``mixgf embed-merge``: the shards of a sharded embedding run merged into OUT (input obs order)
    and its other outputs written; returns one line per file written. Holds OUT's lock (a second merge,
    or a one-process run to OUT, is refused; what a killed merge left is removed)."""
    with output_lock(out):
        _, record, adata, genes = merge(out, "embed")
        optional = {name: Path(record[name]) if record.get(name) else None for name in ("gene_embeddings", "umap")}
        return write_outputs(adata, genes, out, record["key"], optional["gene_embeddings"], optional["umap"],
                             record.get("color"), keep_shards=keep_shards)
