"""Perturbation result folders: the tables, shards of a distributed run and their merge."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..config import changed_settings, load_config, save_config, to_dict
from ..errors import ArtifactError, ConfigError, InputDataError
from ..fileio import (
    OUTPUT_MARKER,
    atomic_directory,
    atomic_file,
    check_readable_file,
    check_writable,
    claim_outputs,
    read_json,
    write_json,
    write_output_marker,
    written_by_package,
)
from ..plots import perturbation_ranking
from .cells import PerturbationResult
from .config import PerturbConfig
from .stats import StatsMode, run_statistics

if TYPE_CHECKING:
    from ..vocab import Vocabulary

_SHARD_NAME = re.compile(r"-of-(\d+)")


def write_results(
    out_dir: str | os.PathLike,
    result: PerturbationResult,
    stats: pd.DataFrame | None,
    config: PerturbConfig,
    vocab: Vocabulary | None = None,
    figure: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a run's tables (parquet + CSV), summary, config and ranking figure, atomically.

    Files: ``cells.parquet`` (per cell and perturbation), ``genes.parquet`` / ``genes.csv`` (the
    statistics), ``gene_shifts.parquet`` (when measured), ``summary.json`` (with the statistics'
    mode and the score column they tested), ``config.yaml``, ``ranking.png``.
    """

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        result.cells.to_parquet(tmp / "cells.parquet", index=False)
        if result.gene_shifts is not None:
            result.gene_shifts.to_parquet(tmp / "gene_shifts.parquet", index=False)
        if stats is not None:
            stats.to_parquet(tmp / "genes.parquet", index=False)
            stats.to_csv(tmp / "genes.csv", index=False)
            if figure and len(stats):

                score = "mean_" + stats.attrs.get("score", "shift")
                # vs_null tests (and genes.csv ranks by) the shift beyond the null run's: the figure shows the same
                score = f"{score}_vs_null" if f"{score}_vs_null" in stats.columns else score
                label = "symbol" if "symbol" in stats.columns and (stats["symbol"] != "").any() else "perturbed"
                perturbation_ranking(
                    stats.assign(label=np.where(stats.get("symbol", "") != "", stats.get("symbol", ""), stats["perturbed"]))
                    if label == "symbol" else stats,
                    top=20, score=score, label="label" if label == "symbol" else "perturbed",
                    fdr="fdr" if "fdr" in stats.columns else None,
                    title=f"in silico {config.perturb}: {score}", save=tmp / "ranking.png",
                )
        tested = {"statistics": {key: stats.attrs[key] for key in ("mode", "score", "requested", "note") if key in stats.attrs}}
        tested = tested if stats is not None else {}
        write_json(tmp / "summary.json", {**result.summary, **tested, "vocab_hash": vocab.hash if vocab else None})
        save_config(config, tmp)
    return Path(out_dir)


def merge_shards(tables: Sequence[pd.DataFrame | str | os.PathLike]) -> pd.DataFrame:
    """Concatenate per-shard cell tables (DataFrames or parquet paths) in the deterministic order."""
    frames = [pd.read_parquet(t) if not isinstance(t, pd.DataFrame) else t for t in tables]
    if not frames:
        raise InputDataError("no shard tables to merge")
    frame = pd.concat(frames, ignore_index=True)
    if frame.duplicated(["cell", "perturbed"]).any():
        raise InputDataError("shard tables overlap (a cell appears in two shards); merge each shard once")
    return frame.sort_values(["cell", "gene_rank", "perturbed"], kind="stable").reset_index(drop=True)


def is_shard_run(config: PerturbConfig) -> bool:
    """Whether ``config`` is one shard of a multi-process run (each shard writes only its table)."""
    return config.shard()[1] > 1


def _run_options(config: PerturbConfig) -> PerturbConfig:
    """The options of the whole sharded run: what every shard shares (not its index or device)."""
    return dataclasses.replace(config, shard_index=None, num_shards=None, device=None)


def check_shard_folder(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> None:
    """The output folder of one shard of a run, before any work: writable, none of the ``inputs``
    nor inside one, and new or a perturbation run's folder (the shards of a run share it)."""
    out = check_writable(out_dir, inputs, "--out")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} is a file; a sharded run writes a folder (OUT/shards/). Choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not (out / "shards").is_dir() and not written_by_package(out):
        raise ArtifactError(f"--out {out} holds files of something else (no shards/ folder, no {OUTPUT_MARKER}); a sharded "
                            "run writes only into a folder of its own. Choose another --out.")


def write_shard(
    out_dir: str | os.PathLike, result: PerturbationResult, config: PerturbConfig, inputs: dict[str, Any] | None = None
) -> Path:
    """Write this shard's cell table to ``out_dir/shards/cells-RRRRR-of-WWWWW.parquet`` atomically,
    last: before it go its options (``config-*.yaml``, which the merge reuses), its summary with
    ``inputs`` (what it read, e.g. :func:`sharding.files_signature`; the merge refuses shards that
    read different inputs) and its gene-shift table (``gene_shifts-*.parquet``) when measured."""
    index, world = config.shard()
    shards = Path(out_dir) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    if not (Path(out_dir) / OUTPUT_MARKER).exists():
        write_output_marker(out_dir)
    name = f"{index:05d}-of-{world:05d}"
    save_config(_run_options(config), shards, f"config-{name}.yaml")
    write_json(shards / f"summary-{name}.json", {"summary": result.summary, "inputs": inputs})
    shifts = shards / f"gene_shifts-{name}.parquet"
    shifts.unlink(missing_ok=True)  # an earlier run's, if this one measures none
    if result.gene_shifts is not None:
        with atomic_file(shifts, "wb") as handle:
            result.gene_shifts.to_parquet(handle, index=False)
    target = shards / f"cells-{name}.parquet"
    with atomic_file(target, "wb") as handle:
        result.cells.to_parquet(handle, index=False)
    return target


def shard_options(shards: Path, given: PerturbConfig | None) -> PerturbConfig:
    """The options the shards in ``shards`` ran with (``given``, for shards that saved none, must
    match them): the statistics test the score those options chose and the merge records them."""
    saved = sorted(shards.glob("config-*-of-*.yaml"))
    texts = {path.read_text() for path in saved}
    if len(texts) > 1:
        raise ArtifactError(f"the shards in {shards} ran with different options ({len(texts)} versions of config-*.yaml); "
                            "rerun every shard with the same options")
    if not saved:
        if given is None:
            raise ArtifactError(f"the shards in {shards} saved no options (config-*.yaml); pass the run's options "
                                "(CLI: perturb-merge --config FILE) so the statistics test the score it used")
        return given
    options = load_config(PerturbConfig, saved[0])
    if given is not None:
        changed = [c for c in changed_settings(to_dict(options), to_dict(_run_options(given)))
                   if c[0] not in ("batch_size", "device")]  # neither changes what is computed
        if changed:
            raise ConfigError("the given options differ from those the shards ran with: "
                              + ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
                              + f"; drop --config to use the shards' own ({saved[0]})")
    return options


def read_cells(folder: str | os.PathLike) -> pd.DataFrame:
    """The ``cells.parquet`` table of a finished run (e.g. the null run of ``stats_mode="vs_null"``)."""
    path = check_readable_file(Path(folder) / "cells.parquet", "perturbation table of the null run")
    return pd.read_parquet(path)


def finish_run(
    out_dir: str | os.PathLike,
    result: PerturbationResult,
    config: PerturbConfig,
    vocab: Vocabulary,
    stats_mode: StatsMode = "vs_all",
    null_cells: pd.DataFrame | None = None,
    overwrite: bool = False,
) -> pd.DataFrame | None:
    """Statistics of ``result`` and its folder (:func:`write_results`); returns the statistics."""
    table = (
        run_statistics(result.cells, vocab, mode=stats_mode, null=null_cells, score=config.statistics_score)
        if len(result.cells) else None
    )
    write_results(out_dir, result, table, config, vocab, overwrite=overwrite)
    return table


def check_merged(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``out_dir/merged``, where :func:`merge_run` writes, checked before any work: a merge made before
    is refused without ``overwrite`` (as ``embed-merge`` refuses a merged OUT), and a folder there that
    this package did not write always. Returns the path."""
    merged = Path(out_dir) / "merged"
    if not (merged.exists() or merged.is_symlink()):
        return merged
    if not written_by_package(merged):  # replaced only if it is ours
        raise ArtifactError(
            f"{merged} exists and was not written by mixgeneformer (no {OUTPUT_MARKER}); perturb-merge writes its result "
            "there. Move that folder away, then merge again."
        )
    if not overwrite:
        raise ArtifactError(
            f"{merged} already exists: the shards of {Path(out_dir)} were merged before. Nothing was changed; pass "
            "--overwrite (API: overwrite=True) to merge them again and replace it (e.g. with other --stats, or "
            "after rerunning shards)."
        )
    return merged


def merge_run(
    out_dir: str | os.PathLike,
    vocab: Vocabulary,
    config: PerturbConfig | None = None,
    stats_mode: StatsMode = "vs_all",
    null_cells: pd.DataFrame | None = None,
    overwrite: bool = False,
) -> tuple[Path, PerturbationResult, pd.DataFrame | None]:
    """Join the shard tables of a sharded run (``out_dir/shards``) into ``out_dir/merged``, with
    statistics and figure. ``config``: None uses the options the shards saved (a given one must
    match them). An earlier merge is replaced only with ``overwrite`` (:func:`check_merged`); the
    merge holds the lock of ``merged`` throughout (a second merge meanwhile is refused). Returns
    (merged folder, merged result, statistics)."""
    merged = Path(out_dir) / "merged"
    with claim_outputs(lambda: check_merged(out_dir, overwrite), merged):
        folder = Path(out_dir) / "shards"
        shards = _complete_shards(folder)
        config = shard_options(folder, config)
        summaries = _shard_summaries(shards)
        shifts = [p.with_name(p.name.replace("cells-", "gene_shifts-", 1)) for p in shards] if config.gene_shifts else []
        shifts = [path for path in shifts if path.is_file()]
        if shifts and len(shifts) != len(shards):
            raise ArtifactError(f"only {len(shifts)} of the {len(shards)} shards in {folder} measured gene shifts; rerun every shard with the same options")
        cells = merge_shards(shards)
        gene_shifts = _merge_gene_shifts([pd.read_parquet(p) for p in shifts]) if shifts else None
        result = PerturbationResult(cells, gene_shifts, _merged_summary(summaries, len(shards), cells))
        table = finish_run(merged, result, config, vocab, stats_mode, null_cells, overwrite=True)
    return merged, result, table


def _merge_gene_shifts(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The shards' gene-shift tables as one: per (perturbed, affected) gene, cells summed and mean
    shifts weighted by them (the shards hold disjoint cells), in the order a single run gives."""
    long = pd.concat(frames, ignore_index=True)
    long["total"] = long["n_cells"] * long["mean_gene_shift"]
    table = (long.groupby(["perturbed", "affected_token", "affected"], sort=True)
             .agg(n_cells=("n_cells", "sum"), total=("total", "sum")).reset_index())
    table["mean_gene_shift"] = table.pop("total") / table["n_cells"]
    return table.sort_values(["perturbed", "mean_gene_shift"], ascending=[True, False], kind="stable").reset_index(drop=True)


def _complete_shards(folder: Path) -> list[Path]:
    """The cell tables of every shard of one run, in shard order (refused: none, some missing, or
    tables of runs with different shard counts)."""
    shards = sorted(folder.glob("cells-*-of-*.parquet"))
    if not shards:
        raise ArtifactError(f"no shard tables in {folder}; run mixgf perturb with --num-shards first")
    worlds = sorted({int(_SHARD_NAME.search(p.name).group(1)) for p in shards})
    if len(worlds) > 1:
        raise ArtifactError(f"{folder} holds shard tables of runs with {worlds} shards (cells-*-of-N.parquet): delete the "
                            "files of the run you do not want to merge (all its *-of-N.* files), then merge again")
    world = worlds[0]
    missing = sorted(set(range(world)) - {int(p.name.split("-")[1]) for p in shards})
    if missing:
        raise ArtifactError(f"{len(shards)} of {world} shard tables in {folder}; shards {missing} have not finished: wait for "
                            "them, or rerun them (--shard-index I --num-shards N)")
    return shards


def _shard_summaries(shards: list[Path]) -> list[dict[str, Any]]:
    """Each shard's summary record (None for shards written before they had one); refused when the
    shards read different inputs (another model, corpus or vocabulary)."""
    records = []
    for path in shards:
        summary = path.with_name(path.name.replace("cells-", "summary-", 1).replace(".parquet", ".json"))
        records.append(read_json(summary) if summary.is_file() else None)
    known = [(path, record["inputs"]) for path, record in zip(shards, records, strict=True) if record and record.get("inputs")]
    for path, inputs in known[1:]:
        if inputs != known[0][1]:
            raise ArtifactError(f"shard {path.name} read other inputs than {known[0][0].name} (a changed model, input or "
                                "vocabulary between the shards); rerun every shard with the same inputs")
    return [record["summary"] for record in records if record]


def _merged_summary(summaries: list[dict[str, Any]], n_shards: int, cells: pd.DataFrame) -> dict[str, Any]:
    """The summary of the whole run: the shards' counts summed (the cell selection is the same on every shard)."""
    merged: dict[str, Any] = {"shards": n_shards, "cells_perturbed": int(cells["cell"].nunique())}
    for key in ("variants", "cells_skipped_gene_absent", "cells_skipped_no_gene_left", "variants_inserting_absent_genes"):
        values = [s[key] for s in summaries if key in s]
        if len(values) == n_shards:
            merged[key] = int(sum(values))
    for key in ("cells_selected", "cells_dropped_few_genes", "cells_dropped_by_tokenizer", "species"):
        if summaries and key in summaries[0]:
            merged[key] = summaries[0][key]
    return merged
