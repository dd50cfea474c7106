"""Perturbation result folders: the tables, shards of a distributed run and their merge."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..config import save_config
from ..errors import InputDataError
from ..fileio import atomic_directory, write_json
from ..plots import perturbation_ranking
from .cells import PerturbationResult
from .config import PerturbConfig

if TYPE_CHECKING:

    from ..vocab import Vocabulary


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
    statistics), ``gene_shifts.parquet`` (when measured), ``summary.json``, ``config.yaml``,
    ``ranking.png``.
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
                label = "symbol" if "symbol" in stats.columns and (stats["symbol"] != "").any() else "perturbed"
                perturbation_ranking(
                    stats.assign(label=np.where(stats.get("symbol", "") != "", stats.get("symbol", ""), stats["perturbed"]))
                    if label == "symbol" else stats,
                    top=20, score=score, label="label" if label == "symbol" else "perturbed",
                    fdr="fdr" if "fdr" in stats.columns else None,
                    title=f"in silico {config.perturb}: {score}", save=tmp / "ranking.png",
                )
        write_json(tmp / "summary.json", {**result.summary, "vocab_hash": vocab.hash if vocab else None})
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
