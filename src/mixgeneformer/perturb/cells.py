"""The user API: perturb the cells of a tokenized corpus or an AnnData."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..bundle import load_for_inference
from ..corpus import check_token_input, load_corpus, refuse_tokenize_options
from ..devices import resolve_device
from ..errors import (
    ConfigError,
    InputDataError,
    VocabularyMismatchError,
    check_anndata,
    check_config,
)
from ..inference import embed_corpus, encoder_of, layers_to_run
from ..parallel import rank_device
from ..readers.cells import count_format, read_cells
from ..sharding import cells_tokenize_config
from ..tokenize import TokenizeConfig, species_counts, tokenize_for_model, warn_dropped
from .config import PerturbConfig
from .engine import _exact, _genes_per_cell
from .screen import _screen
from .stats import StatsMode, run_statistics
from .variants import resolve_genes

if TYPE_CHECKING:
    import anndata
    import datasets

    from ..medians import GeneMedians
    from ..vocab import Vocabulary

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PerturbationResult:
    """What :func:`perturb_cells` returns.

    Attributes
    ----------
    cells
        One row per (cell, perturbation): ``cell`` (dataset row), ``state``, ``perturbed`` (token
        name, ``a+b`` for a set), ``gene_token``, ``gene_rank`` (rank in the original cell),
        ``n_genes``, ``shift``, ``goal_shift`` / ``alt_shift:<state>`` when states are given,
        ``anchor_shift`` with an anchor, ``exact`` (and ``*_estimate``) in screening mode.
    gene_shifts
        With ``gene_shifts=True``: mean shift of each affected gene's state per perturbed gene
        (``perturbed``, ``affected_token``, ``affected``, ``n_cells``, ``mean_gene_shift``).
    summary
        Counts: cells perturbed, skipped (gene absent), dropped (too few genes), variants, time.
    """

    cells: pd.DataFrame
    gene_shifts: pd.DataFrame | None
    summary: dict[str, Any]


# long: a 23-line docstring; resolve genes, select cells, run, assemble share one set of locals.
def perturb_cells(
    model: torch.nn.Module,
    dataset: datasets.Dataset | Sequence[Sequence[int]],
    vocab: Vocabulary,
    config: PerturbConfig | None = None,
    states: Sequence[str] | None = None,
    progress: bool = True,
) -> PerturbationResult:
    """Perturb tokenized cells and score how their embeddings move.

    Parameters
    ----------
    model
        ``MixGeneformerForPretraining``, ``BertForMaskedLM`` or ``BertModel``.
    dataset
        Tokenized corpus (column ``input_ids``, plus ``config.state_column`` when states are
        used), or a list of token id sequences.
    vocab
        The model's vocabulary.
    config
        :class:`PerturbConfig` (defaults: delete every gene of every cell).
    states
        Cell states aligned with ``dataset`` (overrides ``config.state_column``'s column).
    progress
        Show a progress bar over cells.

    Returns
    -------
    PerturbationResult
        Per-(cell, perturbation) scores in a deterministic order (dataset row, then gene rank).
    """

    check_config(config, PerturbConfig)
    config = config or PerturbConfig()
    started = time.perf_counter()
    bert = encoder_of(model)
    layers_to_run(len(bert.encoder.layer), config.layer)
    device = resolve_device(rank_device(config.device))  # under torchrun: cuda:LOCAL_RANK, as embed / predict
    flat, offsets = _read_tokens(dataset)
    lengths = np.diff(offsets)
    _check_cells(flat, lengths, bert, vocab)
    labels = _state_labels(dataset, config, states, len(lengths))
    only = _only_species(dataset)  # every cell of one species: a gene of the other is mapped or refused
    species = _species_for(config, only)
    gene_tokens = resolve_genes(config.genes, vocab, species, only) if config.genes else None
    anchor_token = int(resolve_genes([config.anchor], vocab, species, only)[0]) if config.anchor else None
    special = vocab.special_ids
    n_genes = _genes_per_cell(flat, offsets, special)

    chosen, state_rows = _select_cells(labels, config, len(lengths))
    too_small = chosen[n_genes[chosen] < config.min_genes]
    if len(too_small):
        logger.warning("dropping %d cells with fewer than %d genes", len(too_small), config.min_genes)
    if len(chosen) and len(too_small) == len(chosen):
        raise InputDataError(_all_dropped_message(config, n_genes[chosen]))
    chosen = chosen[n_genes[chosen] >= config.min_genes]
    shard_index, num_shards = config.shard()
    mine = chosen[shard_index::num_shards]

    def sequences(rows: np.ndarray) -> list[np.ndarray]:
        return [flat[offsets[r] : offsets[r + 1]] for r in rows.tolist()]

    was_training = model.training
    model.eval()
    try:
        # State means from every state cell (identical on every shard), plus this shard's originals.
        need = np.unique(np.concatenate([mine, *state_rows.values()])) if state_rows else mine
        with torch.inference_mode():
            base = (
                embed_corpus(
                    model, sequences(need), vocab, config.layer, config.pooling,
                    config.batch_size, device, progress=False, precision=config.precision,
                ).astype(np.float64)
                if len(need)
                else np.zeros((0, bert.config.hidden_size))
            )
        model.eval()
        base_of = {int(r): base[i] for i, r in enumerate(need.tolist())}
        targets = {
            name: np.mean([base_of[int(r)] for r in rows], axis=0) for name, rows in state_rows.items()
        }
        if config.mode == "screen":
            frame, summary = _screen(bert, flat, offsets, mine, base_of, targets, vocab, config, device, progress)
            gene_frame = None
        else:
            frame, gene_frame, summary = _exact(
                bert, flat, offsets, mine, base_of, targets, vocab, config, device, gene_tokens, anchor_token, progress
            )
    finally:
        model.train(was_training)
    _check_no_gene_left(summary, config, len(mine), num_shards)
    if gene_tokens is not None and len(mine) and not summary["cells_perturbed"] and num_shards == 1:
        raise InputDataError(
            f"none of the {len(mine):,} selected cells expresses {', '.join(config.genes)} (species "
            f"{species!r}); check the gene names and the species (CLI: --species), or choose cells that express them"
        )
    frame.insert(1, "n_genes", n_genes[frame["cell"].to_numpy()])
    if labels is not None:
        frame.insert(1, "state", np.asarray(labels, dtype=object)[frame["cell"].to_numpy()])
    summary.update(
        cells_selected=int(len(chosen)),
        cells_dropped_few_genes=int(len(too_small)),
        shard=[shard_index, num_shards],
        seconds=round(time.perf_counter() - started, 3),
    )
    if getattr(dataset, "column_names", None) and (species_of := species_counts(dataset, chosen)):
        summary["species"] = species_of  # cells selected per species, as every shard selects them
    return PerturbationResult(frame, gene_frame, summary)


def _check_no_gene_left(summary: dict, config: PerturbConfig, n_cells: int, num_shards: int) -> None:
    """Cells holding nothing but the genes a deletion removes are skipped (counted in the summary, with a
    warning); when that leaves no cell perturbed, the run is an error, not an empty table."""
    skipped = int(summary.get("cells_skipped_no_gene_left", 0))
    if not skipped:
        return
    what = "+".join(config.genes) if config.genes else "their one gene"
    if not summary["cells_perturbed"] and num_shards == 1:
        raise InputDataError(
            f"the {skipped:,} of {n_cells:,} selected cells that hold {what} hold no other gene: deleting it would leave "
            "no gene, and no cell is left to perturb. Perturb fewer genes, or choose cells with more genes (raise min_genes)."
        )
    logger.warning("%d cell(s) hold no gene besides %s: deleting it would leave no gene; skipped (summary: "
                   "cells_skipped_no_gene_left)", skipped, what)


def _all_dropped_message(config: PerturbConfig, selected_genes: np.ndarray) -> str:
    """Why nothing is left to perturb: every selected cell has fewer than ``min_genes`` genes."""
    which = f" of state {config.start!r} ({config.state_column!r})" if config.start is not None else ""
    return (
        f"all {len(selected_genes):,} selected cells{which} have fewer than min_genes={config.min_genes} genes (the most "
        f"has {int(selected_genes.max())}) and were dropped; nothing would be perturbed. Lower min_genes (CLI: --set "
        "min_genes=N), or select other cells (start state, cells_per_state)."
    )


def _read_tokens(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 tokens, int64 offsets of n+1) of a corpus or a list of token sequences."""
    if isinstance(dataset, (list, tuple)):
        lengths = np.fromiter((len(seq) for seq in dataset), dtype=np.int64, count=len(dataset))
        flat = np.concatenate([np.asarray(seq, dtype=np.int64) for seq in dataset]) if len(dataset) else np.zeros(0, np.int64)
        return flat, np.concatenate([[0], np.cumsum(lengths)])
    check_token_input(dataset)
    column = dataset.with_format("arrow")[:].column("input_ids").combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    return np.asarray(column.flatten(), dtype=np.int64), offsets - offsets[0]


def _check_cells(flat: np.ndarray, lengths: np.ndarray, bert: torch.nn.Module, vocab: Vocabulary) -> None:
    """Errors for inputs the model cannot read: no cells, empty cells, too long, foreign token ids."""

    if len(lengths) == 0:
        raise InputDataError("there are no cells to perturb")
    if (lengths == 0).any():
        raise InputDataError(f"{int((lengths == 0).sum())} cells have no tokens (first at row {int(np.argmax(lengths == 0))})")
    max_positions = int(bert.config.max_position_embeddings)
    if lengths.max() > max_positions:
        raise InputDataError(
            f"cell {int(np.argmax(lengths))} has {int(lengths.max())} tokens but the model accepts at most "
            f"{max_positions}; tokenize with max_len<={max_positions}"
        )
    if len(vocab) != int(bert.config.vocab_size):
        raise VocabularyMismatchError(
            f"the vocabulary has {len(vocab)} tokens but the model's vocab_size is {bert.config.vocab_size}; "
            "use the vocabulary saved in the model bundle"
        )
    if flat.size and (flat.min() < 0 or flat.max() >= len(vocab)):
        raise InputDataError(
            f"token ids range over [{int(flat.min())}, {int(flat.max())}] but the vocabulary has {len(vocab)} "
            "tokens; the cells were tokenized with another vocabulary"
        )


def _species_for(config: PerturbConfig, only: str | None = None) -> str:
    """The species gene names are read in: ``config.species``, else the cells' one species (``only``), else auto."""
    return config.species if config.species != "auto" else (only or "auto")


def _only_species(dataset: Any) -> str | None:
    """``"human"`` / ``"mouse"`` when every cell of ``dataset`` is of that species (its ``species`` column), else None."""
    if "species" not in (getattr(dataset, "column_names", ()) or ()) or not len(dataset):
        return None
    present = set(pd.unique(pd.Series(dataset["species"], dtype=object)))
    return next(iter(present)) if len(present) == 1 and present <= {"human", "mouse"} else None


def _state_labels(dataset: Any, config: PerturbConfig, states: Sequence[str] | None, n: int) -> np.ndarray | None:
    if states is not None:
        labels = np.asarray(states, dtype=object)
    elif config.state_column:
        names = list(getattr(dataset, "column_names", None) or [])
        if config.state_column not in names:
            raise InputDataError(
                f"state_column {config.state_column!r} is not a column of the corpus (columns: {names}); "
                "tokenize with obs_columns including it or choose another column"
            )
        labels = np.asarray(dataset[config.state_column], dtype=object)
    else:
        return None
    if len(labels) != n:
        raise InputDataError(f"{len(labels)} state labels for {n} cells; give one label per cell")
    labels = np.where(pd.isna(labels), None, labels.astype(str)).astype(object)
    present = sorted({str(x) for x in labels if x is not None})
    for field in ("start", "goal"):
        value = getattr(config, field)
        if value is not None and value not in present:
            raise InputDataError(f"{field} state {value!r} has no cells in {config.state_column!r}; states: {present}")
    for value in config.alternatives:
        if value not in present:
            raise InputDataError(f"alternative state {value!r} has no cells in {config.state_column!r}; states: {present}")
    return labels


def _select_cells(
    labels: np.ndarray | None, config: PerturbConfig, n: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows to perturb, and rows of each named state (goal / alternatives; at most cells_per_state)."""
    if labels is None:
        return np.arange(n), {}
    rng_seed = config.seed

    def rows_of(state: str) -> np.ndarray:
        rows = np.flatnonzero(labels == state)
        if config.cells_per_state is not None and len(rows) > config.cells_per_state:
            # A per-state seed, so a state's sample does not depend on which other states exist
            # (a checksum of the name: states spelled with the same letters draw different cells).
            rng = np.random.default_rng([rng_seed, zlib.crc32(state.encode())])
            rows = np.sort(rng.choice(rows, config.cells_per_state, replace=False))
        return rows

    state_rows = {}
    for name in [config.goal, *config.alternatives]:
        if name is not None:
            state_rows[name] = rows_of(name)
    if config.start is not None:
        chosen = rows_of(config.start)
    else:
        chosen = np.arange(n)
        if config.cells_per_state is not None:
            chosen = np.sort(np.concatenate([rows_of(s) for s in sorted({str(x) for x in labels if x is not None})]))
    return chosen, state_rows


def _check_stats_mode(stats_mode: str | None, config: PerturbConfig) -> None:
    """Refuse, before any work, statistics :func:`perturb_anndata` cannot compute for this run."""
    if stats_mode not in (None, "vs_all", "aggregate"):
        raise ConfigError(
            f"stats_mode={stats_mode!r}; perturb_anndata computes 'vs_all', 'aggregate' or None. For 'vs_null', pass "
            "stats_mode=None and call perturbation_statistics(result.cells, vocab, mode='vs_null', null=<null run's cells>)"
        )
    if stats_mode == "vs_all" and config.scores_one_perturbation:
        raise ConfigError(
            "this run scores a single perturbation (one gene, or a combined set), which stats_mode='vs_all' would test "
            "against itself; use stats_mode='aggregate', or None and perturbation_statistics(mode='vs_null')"
        )


# long: argument checks first and a docstring of every parameter; the body is tokenize, perturb, statistics
def perturb_anndata(
    adata: anndata.AnnData,
    model_or_bundle: str | os.PathLike | torch.nn.Module,
    config: PerturbConfig | None = None,
    *,
    vocab: Vocabulary | str | os.PathLike | None = None,
    medians: GeneMedians | str | os.PathLike | None = None,
    tokenize_config: TokenizeConfig | None = None,
    stats_mode: StatsMode | None = "vs_all",
    progress: bool = True,
) -> tuple[PerturbationResult, pd.DataFrame | None]:
    """Tokenize an AnnData with the model bundle's vocabulary and medians, then perturb it.

    Parameters
    ----------
    adata
        Raw counts (cells × genes); not modified.
    model_or_bundle
        A model bundle folder (``bundle.load_bundle``) or a loaded model (then pass ``vocab`` and
        ``medians``).
    config
        :class:`PerturbConfig` (default: delete every gene of every cell); ``state_column`` names an
        ``obs`` column.
    vocab, medians
        The vocabulary and gene medians (objects or paths to their files): required with a loaded
        model, else they replace the bundle's (:func:`mixgeneformer.bundle.load_for_inference`).
    tokenize_config
        :class:`mixgeneformer.tokenize.TokenizeConfig` (default: the bundle's ``tokenize.yaml``;
        ``max_len`` capped at the model's).
    stats_mode
        ``"vs_all"`` or ``"aggregate"``; None computes none (one shard of a run: the merge tests).
        ``"vs_null"`` needs a second run's table: refused here, use :func:`perturbation_statistics`.
    progress
        Show a progress bar over cells.

    Returns
    -------
    (PerturbationResult, pandas.DataFrame or None)
        The per-cell table (``cell`` = obs position, plus ``obs_name``) and the statistics.
    """

    check_anndata(adata)
    check_config(config, PerturbConfig)
    config = config or PerturbConfig()
    _check_stats_mode(stats_mode, config)
    resolve_device(rank_device(config.device))  # before the model loads and the cells are tokenized
    model, vocab, medians, tokenize_config, _ = load_for_inference(model_or_bundle, vocab, medians, tokenize_config)
    if config.state_column and config.state_column not in adata.obs.columns:
        raise InputDataError(
            f"state_column {config.state_column!r} is not an obs column; obs columns: {list(adata.obs.columns)}"
        )
    columns = [config.state_column] if config.state_column else []
    max_positions = int(encoder_of(model).config.max_position_embeddings)
    corpus, obs_rows, _ = tokenize_for_model(adata, vocab, medians, tokenize_config, max_positions, obs_columns=columns)
    n_dropped = warn_dropped(adata.n_obs, obs_rows, corpus, "were not perturbed")
    result = perturb_cells(model, corpus, vocab, config, progress=progress)
    result.summary["cells_dropped_by_tokenizer"] = int(n_dropped)
    result.cells["cell"] = obs_rows[result.cells["cell"].to_numpy()]
    result.cells.insert(1, "obs_name", np.asarray(adata.obs_names, dtype=object)[result.cells["cell"].to_numpy()])
    if stats_mode is None:
        return result, None
    stats = run_statistics(result.cells, vocab, mode=stats_mode, score=config.statistics_score)
    return result, stats


def perturb_file(
    input: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    config: PerturbConfig | None = None,
    *,
    vocab: Vocabulary | str | os.PathLike | None = None,
    medians: GeneMedians | str | os.PathLike | None = None,
    tokenize_config: TokenizeConfig | None = None,
    progress: bool = True,
) -> tuple[PerturbationResult, Vocabulary]:
    """Perturb the cells of a tokenized corpus folder (:func:`perturb_cells`) or of a count input
    (:func:`perturb_anndata`: an ``.h5ad``, ``.loom`` or 10x ``.h5`` file, a 10x ``matrix.mtx`` folder or
    a TileDB-SOMA experiment, read by :func:`readers.cells.read_cells` and tokenized with ``tokenize_config``
    or the bundle's own) with the model bundle ``bundle_dir`` (``vocab`` / ``medians``: for a plain Hugging
    Face folder, or instead of the bundle's; see :func:`bundle.load_for_inference`); returns the result and
    the model's vocabulary."""
    if count_format(input) is None:  # a corpus is used as it was tokenized: its options refused, not ignored
        refuse_tokenize_options(input, "perturb", tokenize_config=tokenize_config)
    loaded, vocab, medians, tk_config, _ = load_for_inference(bundle_dir, vocab, medians, tokenize_config)
    if count_format(input) is None:
        return perturb_cells(loaded, load_corpus(input), vocab, config, progress=progress), vocab
    adata = read_cells(input, tk_config.read_options if tk_config is not None else None)
    result, _ = perturb_anndata(
        adata, loaded, config, vocab=vocab, medians=medians, tokenize_config=cells_tokenize_config(Path(input), tk_config),
        stats_mode=None, progress=progress,  # the caller tests (finish_run), or the merge of the shards
    )
    return result, vocab
