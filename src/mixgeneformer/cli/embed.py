"""``mixgf embed``: cell (and gene) embeddings of an h5ad file or a tokenized corpus."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import typer

from ..errors import ArtifactError, ConfigError
from ..fileio import atomic_file, check_output, read_h5ad, writing
from ._app import MEDIANS_OPTION, VOCAB_OPTION, app, load_tokenize_config


def _write_h5ad(adata, out: Path, overwrite: bool) -> None:
    """Write an h5ad atomically (temporary sibling, then rename)."""
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}.h5ad"
        try:
            adata.write_h5ad(tmp, compression="gzip")
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _check_outputs(outputs: dict[str, Path | None], inputs: list[Path | None], overwrite: bool) -> None:
    """Every output path is valid, distinct and replaces no input (before any work is done)."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffixes = {"--out": {".h5ad"}, "--gene-embeddings": {".parquet"},
                "--umap": {f".{s}" for s in FigureCanvasBase.get_supported_filetypes()}}
    given = {option: path for option, path in outputs.items() if path is not None}
    for option, path in given.items():
        if path.suffix.lower() not in suffixes[option]:
            raise ConfigError(f"{option} {path} must end in one of {sorted(suffixes[option])}")
        check_output(path, inputs, overwrite=overwrite, option=option, writes=path.suffix.lower())
    resolved = [p.resolve() for p in given.values()]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"{', '.join(given)} must be different files")


def _check_color(input: Path, color: str | None, backed: bool = False):
    """The input (h5ad: the AnnData, read once, backed when ``backed``; corpus: None) after checking
    --color exists in it."""
    if input.is_dir():
        from ..embed import load_corpus

        columns = [c for c in load_corpus(input).column_names if c != "input_ids"]
        adata = None
    else:
        adata = read_h5ad(input, "input h5ad", backed="r" if backed else None)
        columns = list(adata.obs.columns)
    if color is not None and color not in columns:
        raise ConfigError(f"--color {color!r} is not a column of {input}; available: {columns}")
    return adata


@app.command("embed")
def embed(
    input: Path = typer.Argument(..., help="An .h5ad file with raw counts, or a tokenized corpus folder."),
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder (config.json, model.safetensors, vocab.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad (the input's cells with obsm[KEY])."),
    key: str = typer.Option("X_mixgeneformer", help="obsm key to write."),
    layer: int = typer.Option(-2, help="Hidden state to pool: -1 last layer, -2 second to last (default), 0 embeddings."),
    pooling: str = typer.Option("mean", help="'mean' over gene tokens or 'cls' (needs <cls>, i.e. style v2)."),
    gene_embeddings: Path | None = typer.Option(
        None, "--gene-embeddings", help="Also write each gene's mean contextual embedding to this .parquet."
    ),
    umap: Path | None = typer.Option(None, "--umap", help="Also draw a UMAP of the embeddings to this image (.png/.pdf)."),
    color: str | None = typer.Option(None, "--color", help="obs column to colour the UMAP by (e.g. cell_type1)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Cells per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16."),
    vocab: Path | None = VOCAB_OPTION,
    medians: Path | None = MEDIANS_OPTION,
    tokenize_config: Path | None = typer.Option(
        None, "--tokenize-config", help="YAML of tokenize options (style, add_species_token, max_len, ...)."
    ),
    gene_column: str | None = typer.Option(None, "--gene-column", help="var column with gene IDs/symbols (default var_names)."),
    species: str = typer.Option("auto", help="auto, human or mouse."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT and an existing obsm[KEY]."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    shard_index: int | None = typer.Option(None, "--shard-index", help="This job's shard (default: env RANK under torchrun)."),
    num_shards: int | None = typer.Option(None, "--num-shards", help="Number of shards (default: env WORLD_SIZE)."),
    timeout: float = typer.Option(86_400, "--timeout", help="Seconds ranks of a launch wait for each other at the end."),
) -> None:
    """Embed cells with a trained model and write them to an h5ad (obsm[KEY]).

    Under torchrun / accelerate launch each rank embeds a length-balanced share of the cells into
    OUT.shards/ and rank 0 writes OUT; with --shard-index/--num-shards run `mixgf embed-merge OUT`
    after every shard. A rerun reuses finished shards.
    """
    from .. import embed as emb
    from ..sharding import shard_role

    if color is not None and umap is None:
        raise ConfigError("--color only applies to --umap FIG.png; add --umap")
    _check_outputs({"--out": out, "--gene-embeddings": gene_embeddings, "--umap": umap},
                   [input, model, vocab, medians, tokenize_config], overwrite)
    if not input.exists():
        raise ArtifactError(f"input {input} does not exist; give an .h5ad file or a tokenized corpus folder")
    role = shard_role(shard_index, num_shards)
    adata = _check_color(input, color, backed=role.world > 1)
    if role.world > 1:
        if adata is not None:
            adata.file.close()
        from ..sharding import embed_sharded

        merged = embed_sharded(
            input, model, out, role=role, key=key, layer=layer, pooling=pooling, batch_size=batch_size, device=device,
            precision=precision, vocab=vocab, medians=medians,
            tokenize_config=None if input.is_dir() else load_tokenize_config(tokenize_config, model),
            gene_column=gene_column, species=species, gene_embeddings=gene_embeddings is not None, progress=progress,
            overwrite=overwrite, extras={"gene_embeddings": gene_embeddings, "umap": umap, "color": color, "overwrite": overwrite},
            timeout_s=timeout, echo=typer.echo,
        )
        if merged is not None:
            from ..sharding import remove_shards

            _write_outputs(merged[0], merged[1], out, key, gene_embeddings, umap, color, overwrite)
            remove_shards(out)
        return

    from ..model import load_bundle

    loaded_model, loaded_vocab, loaded_medians = load_bundle(model, vocab, medians=medians)

    result = None
    if input.is_dir():
        produced = emb.embed_corpus_folder(
            input, loaded_model, key=key, layer=layer, pooling=pooling, vocab=loaded_vocab, batch_size=batch_size,
            device=device, gene_embeddings=gene_embeddings is not None, progress=progress, precision=precision,
        )
        adata, result = produced if isinstance(produced, tuple) else (produced, None)
        adata.uns[f"{key}_params"]["model"] = str(model)
    else:
        tk_config = load_tokenize_config(tokenize_config, model)
        emb.embed_anndata(
            adata, loaded_model, key=key, layer=layer, pooling=pooling, overwrite=overwrite, gene_column=gene_column,
            species=species, vocab=loaded_vocab, medians=loaded_medians, tokenize_config=tk_config,
            batch_size=batch_size, device=device, progress=progress, precision=precision,
            gene_embeddings=gene_embeddings is not None,
        )
        adata.uns[f"{key}_params"]["model"] = str(model)

    genes = None
    if gene_embeddings is not None:
        genes = emb.gene_table(result) if result is not None else adata.uns.pop(f"{key}_genes")
    _write_outputs(adata, genes, out, key, gene_embeddings, umap, color, overwrite)


def _write_outputs(adata, genes, out: Path, key: str, gene_embeddings: Path | None, umap: Path | None,
                   color: str | None, overwrite: bool) -> None:
    """OUT.h5ad, then the gene table and the UMAP figure when asked for."""
    _write_h5ad(adata, out, overwrite)
    typer.echo(f"wrote {out}: obsm[{key!r}] {adata.obsm[key].shape}")
    if genes is not None:
        with atomic_file(gene_embeddings, "wb") as handle:
            genes.to_parquet(handle)
        typer.echo(f"wrote {gene_embeddings}: {len(genes):,} genes x {genes.shape[1] - 1} dims")
    if umap is not None:
        from .. import plots

        plots.umap(adata, color=color, key=key, save=umap)
        typer.echo(f"wrote {umap}")


@app.command("embed-merge")
def embed_merge(
    out: Path = typer.Argument(..., help="The --out .h5ad of a sharded `mixgf embed` run (its shards are in OUT.shards/)."),
    keep_shards: bool = typer.Option(False, "--keep-shards", help="Keep OUT.shards/ after writing OUT."),
) -> None:
    """Merge the shards of `mixgf embed --shard-index I --num-shards N` into OUT (input obs order)."""
    from ..sharding import merge, remove_shards

    kind, record, adata, genes = merge(out)
    if kind != "embed":
        raise ConfigError(f"{out}.shards holds {kind} shards; use mixgf {kind}-merge")
    optional = {name: Path(record[name]) if record.get(name) else None for name in ("gene_embeddings", "umap")}
    _write_outputs(adata, genes, out, record["key"], optional["gene_embeddings"], optional["umap"],
                   record.get("color"), bool(record.get("overwrite")))
    if not keep_shards:
        remove_shards(out)
