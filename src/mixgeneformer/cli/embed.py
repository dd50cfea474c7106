"""``mixgf embed``: cell (and gene) embeddings of a count input (.h5ad, .loom, 10x, SOMA) or a tokenized corpus."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import (
    CELLS_INPUT_HELP,
    MEDIANS_OPTION,
    TOKENIZE_CONFIG_HELP,
    VOCAB_OPTION,
    app,
    claim_cell_outputs,
    load_tokenize_config,
)


@app.command("embed")
def embed(
    input: Path = typer.Argument(..., help=CELLS_INPUT_HELP),
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder (config.json, model.safetensors, vocab.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad (the input's cells with obsm[KEY])."),
    key: str = typer.Option("X_mixgeneformer", help="obsm key to write."),
    layer: int = typer.Option(-2, help="Hidden state to pool: -1 last layer, -2 second to last (default), 0 embeddings."),
    pooling: str = typer.Option("mean", help="'mean' over gene tokens or 'cls' (needs <cls>, i.e. style v2)."),
    gene_embeddings: Path | None = typer.Option(
        None, "--gene-embeddings", help="Also write each gene's mean contextual embedding to this .parquet (over the cells whose top-ranked tokens hold the gene; n_cells counts them)."
    ),
    umap: Path | None = typer.Option(None, "--umap", help="Also draw a UMAP of the embeddings to this image (.png, .pdf, .svg, .eps or .ps)."),
    color: str | None = typer.Option(None, "--color", help="obs column to colour the UMAP by (e.g. cell_type1)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Cells per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    precision: str = typer.Option("auto", help="auto (bf16 on a GPU that computes it natively, Ampere and later; else fp32), fp32 or bf16."),
    vocab: Path | None = VOCAB_OPTION,
    medians: Path | None = MEDIANS_OPTION,
    tokenize_config: Path | None = typer.Option(
        None, "--tokenize-config", help=TOKENIZE_CONFIG_HELP
    ),
    gene_column: str | None = typer.Option(None, "--gene-column", help="var column with gene IDs/symbols (default var_names; loom: a row attribute, 10x: a feature field)."),
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
    from ..corpus import check_cells_input

    check_cells_input(input)
    with claim_cell_outputs({"--out": out, "--umap": umap, "--gene-embeddings": gene_embeddings}, shard_index, num_shards):
        produced = emb.embed_to_outputs(
            input, model, out, key=key, layer=layer, pooling=pooling, gene_embeddings=gene_embeddings, umap=umap,
            color=color, vocab=vocab, medians=medians, tokenize_config=load_tokenize_config(tokenize_config),
            gene_column=gene_column, species=species, batch_size=batch_size, device=device, precision=precision,
            overwrite=overwrite, progress=progress, shard_index=shard_index, num_shards=num_shards, timeout_s=timeout,
            echo=typer.echo, config_files=[tokenize_config],
        )
        if produced is not None:
            for line in emb.write_outputs(produced[0], produced[1], out, key, gene_embeddings, umap, color):
                typer.echo(line)


@app.command("embed-merge")
def embed_merge(
    out: Path = typer.Argument(..., help="The --out .h5ad of a sharded `mixgf embed` run (its shards are in OUT.shards/)."),
    keep_shards: bool = typer.Option(False, "--keep-shards", help="Keep OUT.shards/ after writing OUT."),
) -> None:
    """Merge the shards of `mixgf embed --shard-index I --num-shards N` into OUT (input obs order)."""
    from .. import embed as emb

    for line in emb.merge_embed_shards(out, keep_shards=keep_shards):
        typer.echo(line)
