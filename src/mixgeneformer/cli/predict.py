"""``mixgf predict``: cell types of new cells from a fine-tuned classifier (one process or sharded)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import (
    CELLS_INPUT_HELP,
    GENE_COLUMN_OPTION,
    TOKENIZE_CONFIG_HELP,
    app,
    claim_cell_outputs,
    load_tokenize_config,
)


@app.command("predict")
def predict(
    input: Path = typer.Argument(..., help=CELLS_INPUT_HELP),
    classifier: Path = typer.Option(..., "--classifier", "-c", help="A fine-tuned classifier folder (mixgf classify: OUT/finetuned)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad: the input's cells with obs[KEY_pred], obs[KEY_prob]."),
    key: str = typer.Option("predicted", "--key", help="Prefix of the obs / obsm / uns entries written (no '/')."),
    batch_size: int = typer.Option(64, "--batch-size", help="Cells per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    tokenize_config: Path | None = typer.Option(None, "--tokenize-config", help=TOKENIZE_CONFIG_HELP),
    gene_column: str | None = GENE_COLUMN_OPTION,
    shard_index: int | None = typer.Option(None, "--shard-index", help="This job's shard (default: env RANK under torchrun)."),
    num_shards: int | None = typer.Option(None, "--num-shards", help="Number of shards (default: env WORLD_SIZE)."),
    timeout: float = typer.Option(86_400, "--timeout", help="Seconds ranks of a launch wait for each other at the end."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT and the input's own obs/obsm/uns entries under KEY."),
) -> None:
    """Predict the class of every cell; under torchrun each rank takes a share (see `mixgf embed`)."""
    from ..classify import predict as pred
    from ..corpus import check_cells_input

    check_cells_input(input)
    with claim_cell_outputs({"--out": out}, shard_index, num_shards):
        adata = pred.predict_file(
            input, classifier, out, key=key, batch_size=batch_size, device=device,
            tokenize_config=load_tokenize_config(tokenize_config, gene_column, input, "predict"), shard_index=shard_index, num_shards=num_shards,
            timeout_s=timeout, overwrite=overwrite, echo=typer.echo, config_files=[tokenize_config],
        )
        if adata is not None:
            typer.echo(pred.write_prediction_file(adata, out, key))


@app.command("predict-merge")
def predict_merge(out: Path = typer.Argument(..., help="The --out .h5ad of a sharded `mixgf predict` run.")) -> None:
    """Merge the shards of `mixgf predict --shard-index I --num-shards N` into OUT (input obs order)."""
    from ..classify import predict as pred

    typer.echo(pred.merge_predict_shards(out))
