"""Tokenizing an in-memory AnnData (for embedding, classification and perturbation)."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import ConfigError, check_config, name_list
from ..fileio import source_name
from ..medians import GeneMedians
from .config import TokenizeConfig
from .encode import (
    TokenizeReport,
    _check_not_empty,
    _check_vocab,
    _features,
    _iter_tables,
    _medians_for,
    warn_low_counts_coverage,
)
from .obs import _check_obs_names, _obs_arrow_types

if TYPE_CHECKING:
    import anndata

    from ..vocab import Vocabulary


def tokenize_for_model(
    adata: anndata.AnnData,
    vocab: Vocabulary,
    medians: GeneMedians | None,
    config: TokenizeConfig | None = None,
    max_positions: int | None = None,
    obs_columns: Sequence[str] = (),
    **options: Any,
) -> tuple[datasets.Dataset, np.ndarray, TokenizeConfig]:
    """Tokenize new cells for a trained model (embedding, classification, perturbation).

    Parameters
    ----------
    adata, vocab, medians
        The cells and the model's vocabulary and gene medians (required: a model only sees cells
        normalized like its corpus).
    config
        How the model's corpus was tokenized (default :class:`TokenizeConfig`).
    max_positions
        The model's position limit; a longer ``max_len`` is clamped to it.
    obs_columns
        obs columns to carry into the corpus (one name or a list).
    options
        Further :class:`TokenizeConfig` fields to set (``None`` values are ignored), e.g. ``species``.

    Returns
    -------
    (corpus, rows, config)
        The in-memory corpus, the obs row of each corpus row (cells without a vocabulary gene are
        dropped) and the configuration used.
    """
    check_config(config, TokenizeConfig)
    config = config if config is not None else TokenizeConfig()
    if config.medians == "per_file":  # the model's corpus was normalized by each input's own medians
        medians = None
    elif medians is None:
        raise ConfigError(
            "tokenizing needs the gene medians the model was trained with, and none were given (a loaded model "
            "carries none; a bundle folder without medians.tsv neither): pass medians= (a GeneMedians or the path "
            "of its TSV), or use a tokenized corpus instead."
        )
    updates = {name: value for name, value in options.items() if value is not None}
    if max_positions is not None and config.max_len > max_positions:
        updates["max_len"] = max_positions
    if updates:
        config = dataclasses.replace(config, **updates)
    corpus = tokenize_anndata(adata, vocab, medians, config, obs_columns=obs_columns)
    return corpus, np.asarray(corpus["cell_index"], dtype=np.int64), config


def species_counts(corpus: datasets.Dataset, rows: np.ndarray | None = None) -> dict[str, int] | None:
    """Cells per species of a tokenized corpus (its ``rows``, default all), for an output's record; None without
    a ``species`` column."""
    if "species" not in corpus.column_names:
        return None
    values = pd.Series(corpus["species"], dtype=object)
    values = values if rows is None else values.iloc[np.asarray(rows, dtype=np.int64)]
    return {str(name): int(n) for name, n in values.value_counts().sort_index().items()}


def warn_dropped(n_obs: int, rows: np.ndarray, corpus: datasets.Dataset, consequence: str) -> int:
    """How many of an AnnData's ``n_obs`` cells :func:`tokenize_for_model` dropped (``rows``: the
    obs positions it kept); a warning saying so and what it means (``consequence``) when any."""
    n_dropped = n_obs - len(np.unique(rows))
    if n_dropped:
        warnings.warn(
            f"{n_dropped} of {n_obs} cells were dropped by the tokenizer (no counts, no gene in the model's vocabulary, "
            f"or filter_pass=0) and {consequence}. Tokenizer report: {corpus.info.description}",
            UserWarning,
            stacklevel=3,  # the caller of embed_anndata / perturb_anndata
        )
    return n_dropped


def tokenize_anndata(
    adata: anndata.AnnData,
    vocab: Vocabulary,
    medians: GeneMedians | None,
    config: TokenizeConfig | None = None,
    obs_columns: Sequence[str] = (),
) -> datasets.Dataset:
    """Tokenize an in-memory AnnData into an in-memory :class:`datasets.Dataset` (AnnData untouched).

    Columns: ``input_ids`` (list of int32), ``length``, ``species``, ``cell_index`` (row in ``adata``)
    and the requested ``obs_columns``. Cells without counts or vocabulary genes are dropped
    (see ``dataset.info.description`` for the counts); all cells empty → :class:`InputDataError`.
    """

    check_config(config, TokenizeConfig)
    config = config or TokenizeConfig()
    _check_vocab(vocab, config, medians)
    obs_columns = name_list(obs_columns, "obs_columns")
    _check_obs_names(obs_columns)
    started = time.perf_counter()
    # a backed AnnData's source opens its own handle on the file: closed once the types are read
    with config.read_options.open(adata) as source:  # refuses an obs_filter (SOMA inputs only)
        source.check_obs_columns(obs_columns)
        obs_types = _obs_arrow_types(source, obs_columns)
    table_medians = _medians_for(adata, medians, config, vocab)
    tables, report = [], TokenizeReport()
    for table, part, _ in _iter_tables(adata, vocab, table_medians, config, obs_columns, obs_types):
        tables.append(table)
        report.add(part)
    report.seconds = time.perf_counter() - started
    name = source_name(adata, "the AnnData")  # the file it was read from, where known
    _check_not_empty(report, name)
    warn_low_counts_coverage(name, report.counts, report.counts_in_vocabulary, config.min_coverage)
    table = pa.concat_tables([t for t in tables if t.num_rows]).cast(_features(obs_types).arrow_schema)
    info = datasets.DatasetInfo(description=report.summary(), features=_features(obs_types))
    return datasets.Dataset(table, info=info)
