"""``mixgf perturb``: in silico perturbation of a count input (.h5ad, .loom, 10x, SOMA) or a tokenized corpus.

``mixgf perturb-merge`` joins the shard tables of a multi-process run and computes the
statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError
from ._app import (
    CELLS_INPUT_HELP,
    GENE_COLUMN_OPTION,
    MEDIANS_OPTION,
    TOKENIZE_CONFIG_HELP,
    VOCAB_OPTION,
    app,
    load_tokenize_config,
)


def _config_from_options(config_file: Path | None, overrides: list[str] | None, options: dict[str, Any]):
    """PerturbConfig from a YAML file, then explicit CLI options, then ``--set key=value``."""
    from ..config import load_config
    from ..perturb import PerturbConfig

    return load_config(PerturbConfig, config_file, overrides, {k: v for k, v in options.items() if v is not None})


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [] if items == ["all"] else items


# long: Typer declares each of the 35 options as a parameter (41 lines of signature).
@app.command("perturb")
def perturb(
    input: Path = typer.Argument(..., help=CELLS_INPUT_HELP),
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (tables, figure, config.yaml)."),
    perturb_type: str | None = typer.Option(None, "--perturb", help="delete (default), overexpress, activate or inhibit."),
    genes: str | None = typer.Option(None, "--genes", help="'all' (default) or a comma list: INS,GCG or ENSG…"),
    combine: bool | None = typer.Option(None, "--combine/--no-combine", help="Perturb the listed genes together."),
    anchor: str | None = typer.Option(None, "--anchor", help="Gene perturbed together with each other gene."),
    target_rank: int | None = typer.Option(None, "--target-rank", help="Rank for activate/inhibit (0 = top, -1 = last)."),
    state_column: str | None = typer.Option(None, "--state-column", help="obs/corpus column of cell states."),
    start: str | None = typer.Option(None, "--start", help="State whose cells are perturbed."),
    goal: str | None = typer.Option(None, "--goal", help="State to measure the shift towards."),
    alternatives: str | None = typer.Option(None, "--alternatives", help="Comma list of further states."),
    cells_per_state: int | None = typer.Option(None, "--cells-per-state", help="At most N cells per state."),
    mode: str | None = typer.Option(None, "--mode", help="exact (default) or screen (first-order + exact top-k)."),
    screen_top_k: int | None = typer.Option(None, "--screen-top-k", help="Genes re-scored exactly per cell in screen mode."),
    gene_shifts: bool | None = typer.Option(None, "--gene-shifts/--no-gene-shifts", help="Also per-gene embedding shifts."),
    score: str | None = typer.Option(
        None, "--score", help="shift (default: 1 - cos of cell embeddings) or cell_emb (Geneformer's InSilicoPerturber cell score)."
    ),
    layer: int | None = typer.Option(None, "--layer", help="Hidden state used (-2 = second to last, default)."),
    pooling: str | None = typer.Option(None, "--pooling", help="mean (default) or cls."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Sequences per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda when available)."),
    precision: str | None = typer.Option(None, "--precision", help="fp32 (default), bf16 or auto."),
    species: str | None = typer.Option(None, "--species", help="Species of gene symbols: auto, human, mouse."),
    tokenize_config: Path | None = typer.Option(
        None, "--tokenize-config", help=TOKENIZE_CONFIG_HELP
    ),
    gene_column: str | None = GENE_COLUMN_OPTION,
    vocab_file: Path | None = VOCAB_OPTION,
    medians_file: Path | None = MEDIANS_OPTION,
    shard_index: int | None = typer.Option(None, "--shard-index", help="This process' shard (default: env RANK)."),
    num_shards: int | None = typer.Option(None, "--num-shards", help="Number of shards (default: env WORLD_SIZE)."),
    stats: str = typer.Option("vs_all", "--stats", help="vs_all, vs_null (with --null) or aggregate."),
    null: Path | None = typer.Option(None, "--null", help="Output folder of a null run (for --stats vs_null)."),
    config_file: Path | None = typer.Option(None, "--config", help="YAML file of perturbation options."),
    overrides: list[str] | None = typer.Option(None, "--set", help="Override an option: --set screen_probes=16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Perturb genes in silico and rank them by how far they move cells (towards a goal state)."""
    from .. import perturb as pt
    from ..config import to_dict
    from ..corpus import check_cells_input
    from ..devices import resolve_device
    from ..fileio import check_output, claim_outputs
    from ..sharding import files_signature, rank_device

    config = _config_from_options(
        config_file,
        overrides,
        {
            "perturb": perturb_type, "genes": _split(genes), "combine": combine, "anchor": anchor,
            "target_rank": target_rank, "state_column": state_column, "start": start, "goal": goal,
            "alternatives": _split(alternatives), "cells_per_state": cells_per_state, "mode": mode,
            "screen_top_k": screen_top_k, "gene_shifts": gene_shifts, "score": score, "layer": layer, "pooling": pooling,
            "batch_size": batch_size, "device": device, "precision": precision, "species": species,
            "shard_index": shard_index, "num_shards": num_shards,
        },
    )
    _check_stats(stats, null, config)
    resolve_device(rank_device(config.device))  # the device of the --config / --device / --set options, before any work
    check_cells_input(input)
    inputs = [input, model, null, config_file, tokenize_config, vocab_file, medians_file]
    tk_config = load_tokenize_config(tokenize_config, gene_column, input, "perturb")

    def run() -> tuple:
        return pt.perturb_file(input, model, config, vocab=vocab_file, medians=medians_file, tokenize_config=tk_config,
                               progress=progress)

    if pt.is_shard_run(config):  # the shards of one run share OUT by design: each writes its own OUT/shards file
        pt.check_shard_folder(out, inputs)
        read = files_signature([Path(p) for p in inputs if p is not None and p != null])  # the merge compares them
        result, _ = run()
        index, world = config.shard()
        target = pt.write_shard(out, result, config, {"files": read, "tokenize": to_dict(tk_config) if tk_config else None})
        typer.echo(f"shard {index + 1}/{world}: {len(result.cells):,} perturbations -> {target}")
        typer.echo(f"when every shard is done: {_merge_command(out, model, vocab_file, stats, null)}")
        return
    with claim_outputs(lambda: check_output(out, inputs, overwrite=overwrite, option="--out"), out):
        null_cells = _null_cells(null, config)
        result, vocab = run()
        table = pt.finish_run(out, result, config, vocab, stats, null_cells, overwrite)
    _report(out, result, table)


def _merge_command(out: Path, model: Path, vocab: Path | None, stats: str, null: Path | None) -> str:
    """The ``mixgf perturb-merge`` command line that merges this run's shards (its required --model included)."""
    import shlex

    words = ["mixgf", "perturb-merge", str(out), "--model", str(model)]
    words += ["--vocab", str(vocab)] if vocab is not None else []
    words += ["--stats", stats] if stats != "vs_all" else []
    words += ["--null", str(null)] if null is not None else []
    return shlex.join(words)


def _report(out: Path, result, table) -> None:
    typer.echo(
        f"{result.summary.get('cells_perturbed', 0):,} cells, {len(result.cells):,} perturbations -> {out}"
        + (f"; top: {', '.join(table['symbol'].where(table['symbol'] != '', table['perturbed']).head(5))}" if table is not None else "")
    )
    if table is not None and "note" in table.attrs:  # statistics other than those asked for, and why
        typer.echo(f"note: {table.attrs['note']}")


def _check_stats(stats: str, null: Path | None, config=None) -> None:
    """The statistics options, before any work: ``config`` (a run's options) is refused for
    ``vs_all`` when the run would score a single perturbation (nothing to test it against)."""
    if stats not in ("vs_all", "vs_null", "aggregate"):
        raise ConfigError(f"--stats {stats!r}; use vs_all, vs_null or aggregate")
    if (stats == "vs_null") != (null is not None):
        raise ConfigError("--stats vs_null and --null DIR go together (the null run's output folder)")
    if config is None or stats != "vs_all":
        return
    if config.scores_one_perturbation:
        what = "--combine scores one gene set" if config.combine else f"--genes {config.genes[0]} scores one gene"
        raise ConfigError(f"{what}, which --stats vs_all would test against itself; "
                          "use --stats aggregate, or --stats vs_null with --null DIR")


def _null_cells(null: Path | None, config):
    """The null run's cell table (``--null``), refused before the run if it lacks the score tested."""
    from .. import perturb as pt

    if null is None:
        return None
    cells = pt.read_cells(null)
    score = config.statistics_score or ("goal_shift" if config.goal else "shift")
    missing = [c for c in ("perturbed", "gene_token", score) if c not in cells.columns]
    if missing:
        raise ConfigError(f"--null {null}: its cells.parquet has no {missing} column(s), which --stats vs_null compares "
                          "with this run; run the null with the same --goal / --score options")
    null_mode = "screen" if "exact" in cells.columns and f"{score}_estimate" in cells.columns else "exact"
    if null_mode != config.mode:  # first-order estimates would be tested against exact scores
        raise ConfigError(f"--null {null} is a --mode {null_mode} run and this is --mode {config.mode}; "
                          f"run the null with --mode {config.mode}")
    return cells


@app.command("perturb-merge")
def perturb_merge(
    out: Path = typer.Argument(..., help="Output folder of a sharded `mixgf perturb` run."),
    model: Path = typer.Option(..., "--model", "-m", help="The model bundle (for gene names)."),
    stats: str = typer.Option("vs_all", "--stats", help="vs_all, vs_null (with --null) or aggregate."),
    null: Path | None = typer.Option(None, "--null", help="Output folder of a null run."),
    config_file: Path | None = typer.Option(
        None, "--config", help="YAML of the run's options, for shards that saved none (default: the shards' own)."
    ),
    vocab_file: Path | None = VOCAB_OPTION,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Merge again, replacing OUT/merged (e.g. with other --stats, or after rerunning shards)."
    ),
) -> None:
    """Merge the shard tables of OUT/shards into one result with statistics and figure (OUT/merged; a
    merge made before is refused without --overwrite)."""
    from .. import perturb as pt
    from ..perturb.results import check_merged
    from ..vocab import Vocabulary

    _check_stats(stats, null)
    _check_merge_inputs(out, {"--null": null, "--config": config_file, "--vocab": vocab_file})
    check_merged(out, overwrite)
    config = _config_from_options(config_file, None, {}) if config_file is not None else None
    vocab = Vocabulary.load(vocab_file if vocab_file is not None else Path(model) / "vocab.json")
    null_cells = pt.read_cells(null) if null is not None else None
    merged, result, table = pt.merge_run(out, vocab, config, stats, null_cells, overwrite=overwrite)
    _report(merged, result, table)


def _check_merge_inputs(out: Path, inputs: dict[str, Path | None]) -> None:
    """No input of perturb-merge lies in OUT/merged, which the merge replaces with its result."""
    merged = (Path(out) / "merged").resolve()
    for option, path in inputs.items():
        if path is not None and (Path(path).resolve() == merged or merged in Path(path).resolve().parents):
            raise ConfigError(f"{option} {path} is in {Path(out) / 'merged'}, which perturb-merge replaces with its result; "
                              "copy it out of that folder and pass the copy")
