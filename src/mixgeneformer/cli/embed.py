"""``mixgf embed``: cell (and gene) embeddings of an h5ad file or a tokenized corpus."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ArtifactError, ConfigError
from ..fileio import atomic_file, write_h5ad
from ._app import app, load_medians, load_tokenize_config


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
) -> None:
    """Embed cells with a trained model and write them to an h5ad (obsm[KEY])."""
    from .. import embed as emb

    if out.suffix != ".h5ad":
        raise ConfigError(f"--out {out} must end in .h5ad")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it")
    if not input.exists():
        raise ArtifactError(f"input {input} does not exist; give an .h5ad file or a tokenized corpus folder")
    if color is not None and umap is None:
        raise ConfigError("--color only applies to --umap FIG.png; add --umap")

    from ..vocab import Vocabulary

    adata, genes = emb.embed_file(
        input, model, key=key, layer=layer, pooling=pooling, overwrite=overwrite, gene_column=gene_column,
        species=species, vocab=Vocabulary.load(vocab) if vocab is not None else None, medians=load_medians(medians),
        tokenize_config=load_tokenize_config(tokenize_config), batch_size=batch_size, device=device,
        progress=progress, precision=precision, gene_embeddings=gene_embeddings is not None,
    )
    write_h5ad(adata, out)
    typer.echo(f"wrote {out}: obsm[{key!r}] {adata.obsm[key].shape}")
    if genes is not None:
        with atomic_file(gene_embeddings, "wb") as handle:
            genes.to_parquet(handle)
        typer.echo(f"wrote {gene_embeddings}: {len(genes):,} genes x {genes.shape[1] - 1} dims")
    if umap is not None:
        from .. import plots

        plots.umap(adata, color=color, key=key, save=umap)
        typer.echo(f"wrote {umap}")
