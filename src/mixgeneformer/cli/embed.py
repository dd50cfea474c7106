"""``mixgf embed``: cell (and gene) embeddings of an h5ad file or a tokenized corpus."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import typer

from ..errors import ArtifactError, ConfigError
from ..fileio import atomic_file
from ._app import app, load_tokenize_config


def _write_h5ad(adata, out: Path, overwrite: bool) -> None:
    """Write an h5ad atomically (temporary sibling, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}.h5ad"
    try:
        adata.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_paths(input: Path, out: Path, overwrite: bool) -> None:
    """An .h5ad output that exists only with --overwrite, and an input that exists."""
    if out.suffix != ".h5ad":
        raise ConfigError(f"--out {out} must end in .h5ad")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it")
    if not input.exists():
        raise ArtifactError(f"input {input} does not exist; give an .h5ad file or a tokenized corpus folder")


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
    vocab: Path | None = typer.Option(None, "--vocab", help="Vocabulary JSON, for plain Hugging Face model folders."),
    medians: Path | None = typer.Option(None, "--medians", help="Gene medians TSV, when the bundle has none."),
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

    _check_paths(input, out, overwrite)
    if color is not None and umap is None:
        raise ConfigError("--color only applies to --umap FIG.png; add --umap")
    role = shard_role(shard_index, num_shards)
    if role.world > 1:
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

    loaded_model, loaded_vocab, loaded_medians = load_bundle(model, vocab)
    if medians is not None:
        from ..medians import GeneMedians

        loaded_medians = GeneMedians.load(medians)

    result = None
    if input.is_dir():
        produced = emb.embed_corpus_folder(
            input, loaded_model, key=key, layer=layer, pooling=pooling, vocab=loaded_vocab, batch_size=batch_size,
            device=device, gene_embeddings=gene_embeddings is not None, progress=progress, precision=precision,
        )
        adata, result = produced if isinstance(produced, tuple) else (produced, None)
        adata.uns[f"{key}_params"]["model"] = str(model)
    else:
        import anndata as ad

        from ..fileio import check_readable_file

        check_readable_file(input, "input h5ad")
        try:
            adata = ad.read_h5ad(input)
        except (OSError, KeyError, ValueError) as exc:
            raise ArtifactError(f"cannot read {input} as h5ad ({exc}); is it truncated or another format?") from exc
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
