"""``mixgf demo``: the one-command end-to-end demo on the shipped human + mouse pancreas data."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from ._app import app


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo_output"), "--out", "-o", help="Output folder (an unfinished demo there is resumed)."),
    quick: bool = typer.Option(False, "--quick", help="Reduced size for CI: fewer cells, steps and genes per cell (~3 min on 2 cores)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the output folder first and run every step again."),
    device: str | None = typer.Option(None, "--device", help="Torch device for embedding, classification and perturbation (default: cuda if available; pretraining always uses the Trainer's choice: cuda if available)."),
    workers: int | None = typer.Option(None, "--workers", help="Worker processes for medians, tokenization and classification (default 2; results do not depend on it)."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a DemoConfig option, e.g. --set pretrain_steps=200 (repeatable)."
    ),
) -> None:
    """Vocabulary → medians → tokenize → pretrain → embed → classify → perturb → report, in one go.

    Writes ``<out>/report/report.md`` (+ report.html, metrics.json, figures/); each step's
    artifacts go to ``<out>/<step>/``.
    """
    from ..config import apply_overrides, from_dict, to_dict
    from ..demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    base = DemoConfig.quick_config() if quick else DemoConfig()
    values = apply_overrides(to_dict(base), list(set_ or []))
    values.update({name: value for name, value in (("device", device), ("workers", workers)) if value is not None})
    config = from_dict(DemoConfig, values, "demo")
    report = run_demo(out, config, overwrite=overwrite)
    typer.echo(f"demo finished; report: {report}")
