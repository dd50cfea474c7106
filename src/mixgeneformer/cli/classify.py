"""``mixgf classify``: cell-type classification (fine-tuning, zero-shot, transfer, baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import ConfigError
from ._app import (
    GENE_COLUMN_OPTION,
    MEDIANS_OPTION,
    TOKENIZE_CONFIG_HELP,
    VOCAB_OPTION,
    app,
    load_tokenize_config,
)

if TYPE_CHECKING:
    from ..classify.config import BaselineMethod

_MODES = {
    "finetune": ("finetune",),
    "knn": ("knn",),
    "logreg": ("logreg",),
    "zero-shot": ("knn", "logreg"),
    "all": ("knn", "logreg", "finetune"),
    "none": (),
}


def _check_test_file(input: Path, test: Path | None) -> None:
    from ..classify.files import check_test_file

    check_test_file(input, test)  # before the output is claimed; classify_file checks it too


def _option_values(label: str | None, freeze_layers: int | None, epochs: float | None, unseen: str | None,
                   device: str | None) -> dict[str, object]:
    """The config settings the dedicated options stand for, taken as given (not parsed as YAML: a
    column named ``1`` or ``a #b`` stays that string); options not given change nothing."""
    values = {"labels.key": label, "finetune.freeze_layers": freeze_layers, "finetune.epochs": epochs,
              "labels.unseen_test_labels": unseen, "finetune.device": device}
    return {name: value for name, value in values.items() if value is not None}


# long: Typer declares each of the 19 options as a parameter (30 lines of signature).
@app.command("classify")
def classify(
    input: Path = typer.Argument(..., help="Labelled raw counts (train cells; split 80/20 without --test): an .h5ad, .loom or 10x .h5 "
                                 "file, a 10x matrix.mtx folder or a TileDB-SOMA experiment, read as mixgf tokenize reads it."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: metrics, per-class reports, confusion matrices, predictions.h5ad."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model bundle folder (needed unless --mode none)."),
    label: str | None = typer.Option(
        None, "--label", help="obs column with the cell types (default: labels.key of --config, else cell_type1)."
    ),
    mode: str = typer.Option("all", "--mode", help=f"One of {sorted(_MODES)}: which model-based methods to run."),
    test: Path | None = typer.Option(
        None, "--test", help="A second labelled input to test on, in any of those formats (e.g. the other species: cross-species transfer)."
    ),
    baselines: bool = typer.Option(False, "--baselines", help="Also run baselines on the same splits: CellTypist-style logreg and kNN on PCA of the counts; "
        "with a model, logreg on the tokens it reads (logreg_tokens)."),
    freeze_layers: int | None = typer.Option(None, "--freeze-layers", help="Freeze the embeddings and the bottom K encoder layers."),
    epochs: float | None = typer.Option(None, "--epochs", help="Fine-tuning epochs (default 10)."),
    unseen: str | None = typer.Option(None, "--unseen", help="Test labels never seen in training: 'drop' (default, reported) or 'error'."),
    config: Path | None = typer.Option(None, "--config", help="YAML of ClassifyConfig options (labels, embedding, finetune, baselines, synonyms)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config option, e.g. --set finetune.learning_rate=1e-4."),
    tokenize_config: Path | None = typer.Option(None, "--tokenize-config", help=TOKENIZE_CONFIG_HELP),
    gene_column: str | None = GENE_COLUMN_OPTION,
    max_len: int | None = typer.Option(
        None, "--max-len", min=1,
        help="Genes per cell (default: the model's tokenize.yaml); up to the model's positions, e.g. 256 for a model pretrained on 128.",
    ),
    vocab: Path | None = VOCAB_OPTION,
    medians: Path | None = MEDIANS_OPTION,
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda when available)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """Train and evaluate cell-type classifiers; write metrics, reports and predictions to OUT."""
    from .. import classify as clf
    from ..config import load_config
    from ..corpus import check_cells_input
    from ..devices import resolve_device
    from ..fileio import check_output, claim_outputs

    if mode not in _MODES:
        raise ConfigError(f"--mode {mode!r} is not one of {sorted(_MODES)}.")
    methods = _MODES[mode]
    if not methods and not baselines:
        raise ConfigError("--mode none runs nothing without --baselines.")
    if not methods:
        given = [name for name, value in (("--max-len", max_len), ("--model", model), ("--vocab", vocab),
                 ("--medians", medians)) if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} serve the model-based methods; --mode none runs none. Drop them or choose a --mode.")
    if methods and model is None:
        raise ConfigError(f"--mode {mode} needs --model BUNDLE (or use --mode none --baselines).")
    _check_test_file(input, test)
    resolve_device(device)  # a bad --device is refused before any work
    for path, option in ((input, "input"), (test, "--test")):
        if path is not None:
            check_cells_input(path, option, corpus=False)
    inputs = [input, test, model, config, vocab, medians, tokenize_config]
    with claim_outputs(lambda: check_output(out, inputs, overwrite=overwrite, option="--out"), out):
        values = _option_values(label, freeze_layers, epochs, unseen, device)
        settings = load_config(clf.ClassifyConfig, config, overrides, values)
        tok_config = load_tokenize_config(tokenize_config, gene_column)

        run = clf.classify_file(
            input, model if methods else None, test, methods=methods,
            baseline_methods=_baseline_methods(baselines, bool(methods)), config=settings,
            tokenize_config=tok_config, vocab=vocab if methods else None, medians=medians if methods else None,
            device=device, max_len=max_len,
        )
        clf.save_run(run, out, overwrite=overwrite)
    for note in run.task.notes:
        typer.echo(note)
    typer.echo(clf.markdown_table(run.table()))
    typer.echo(f"wrote {out}")


def _baseline_methods(baselines: bool, with_model: bool) -> tuple[BaselineMethod, ...]:
    """``--baselines``: the count baselines, and the token baseline when a model supplies the tokens."""
    if not baselines:
        return ()
    return ("logreg_counts", "knn_pca", "logreg_tokens") if with_model else ("logreg_counts", "knn_pca")
