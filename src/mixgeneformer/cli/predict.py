"""``mixgf predict``: cell types of new cells from a fine-tuned classifier (one process or sharded)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ArtifactError, ConfigError
from ._app import app, load_tokenize_config


@app.command("predict")
def predict(
    input: Path = typer.Argument(..., help="An .h5ad file with raw counts, or a tokenized corpus folder."),
    classifier: Path = typer.Option(..., "--classifier", "-c", help="A fine-tuned classifier folder (mixgf classify: OUT/finetuned)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad: the input's cells with obs[KEY_pred], obs[KEY_prob]."),
    key: str = typer.Option("predicted", "--key", help="Prefix of the obs / obsm columns written."),
    batch_size: int = typer.Option(64, "--batch-size", help="Cells per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    tokenize_config: Path | None = typer.Option(None, "--tokenize-config", help="YAML of tokenize options (style, max_len, ...)."),
    shard_index: int | None = typer.Option(None, "--shard-index", help="This job's shard (default: env RANK under torchrun)."),
    num_shards: int | None = typer.Option(None, "--num-shards", help="Number of shards (default: env WORLD_SIZE)."),
    timeout: float = typer.Option(86_400, "--timeout", help="Seconds ranks of a launch wait for each other at the end."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT."),
) -> None:
    """Predict the class of every cell; under torchrun each rank takes a share (see `mixgf embed`)."""
    from ..sharding import predict_sharded, shard_role
    from .embed import _check_outputs

    _check_outputs({"--out": out}, [input, classifier, tokenize_config], overwrite)
    if not input.exists():
        raise ArtifactError(f"input {input} does not exist; give an .h5ad file or a tokenized corpus folder")
    adata = predict_sharded(
        input, classifier, out, role=shard_role(shard_index, num_shards), key=key, batch_size=batch_size,
        device=device, tokenize_config=None if input.is_dir() else load_tokenize_config(tokenize_config),
        timeout_s=timeout, echo=typer.echo,
    )
    if adata is not None:
        _write(adata, out, key, overwrite)


def _write(adata, out: Path, key: str, overwrite: bool) -> None:
    from ..sharding import remove_shards
    from .embed import _write_h5ad

    _write_h5ad(adata, out, overwrite)
    remove_shards(out)
    counts = adata.obs[f"{key}_pred"].value_counts()
    typer.echo(f"wrote {out}: obs[{key + '_pred'!r}] " + ", ".join(f"{c} {n:,}" for c, n in counts.head(8).items()))


@app.command("predict-merge")
def predict_merge(out: Path = typer.Argument(..., help="The --out .h5ad of a sharded `mixgf predict` run.")) -> None:
    """Merge the shards of `mixgf predict --shard-index I --num-shards N` into OUT (input obs order)."""
    from ..sharding import merge

    kind, record, adata, _ = merge(out)
    if kind != "predict":
        raise ConfigError(f"{out}.shards holds {kind} shards; use mixgf {kind}-merge")
    _write(adata, out, record["key"], overwrite=True)
