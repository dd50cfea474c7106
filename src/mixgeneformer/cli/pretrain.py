"""``mixgf pretrain``: pretrain a model from a YAML run config (one process, or under torchrun)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from ._app import app


@app.command("pretrain")
def pretrain(
    config: Path = typer.Option(..., "--config", "-c", help="Run config YAML (see configs/*.yaml)."),
    overrides: list[str] | None = typer.Argument(
        None, help="Config overrides key=value, e.g. train.max_steps=100 data.max_cells=2000."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint of output_dir."),
    resume_from: Path | None = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output_dir."),
) -> None:
    """Pretrain Mix-Geneformer (MLM + SimCSE) on tokenized corpora; write checkpoints and a model bundle.

    Many GPUs: ``torchrun --nproc_per_node 8 -m mixgeneformer pretrain --config run.yaml`` (or
    ``accelerate launch``). SIGTERM / SIGINT save a checkpoint, then exit with 128 + signal.
    """
    from ..diagnostics import final_evaluation, learning_verdict
    from ..metrics_csv import read_metrics
    from ..pretrain import TrainingInterrupted, load_pretrain_config, run_pretraining

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_config = load_pretrain_config(config, list(overrides or []))
    try:
        result = run_pretraining(run_config, resume=resume, overwrite=overwrite, resume_from=resume_from)
    except TrainingInterrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    typer.echo(f"trained {result.global_step} steps; model bundle: {result.bundle_dir}; metrics: {result.metrics_csv}")
    final = final_evaluation(read_metrics(result.run_dir))
    if final is not None:
        sentence, learned = learning_verdict(final)
        typer.echo(f"held-out cells at step {int(final['step'])}: masked-gene loss {final['mlm_loss']:.3f} nats, "
                   f"rank-position baseline {final.get('rank_unigram_loss', float('nan')):.3f}. {sentence}",
                   err=not learned)
    else:
        typer.echo("no held-out cells (data.eval_fraction = 0): set data.eval_fraction=0.05 to see whether the model "
                   "learns more than gene frequency at each rank.")
