"""Predicting cell types of new cells with a saved fine-tuned classifier, in one process or sharded
over many (``mixgf predict``; see :mod:`mixgeneformer.sharding`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np

from ..bundle import resolve_tokenize_config
from ..config import to_dict
from ..corpus import check_corpus_vocabulary, load_corpus, refuse_tokenize_options
from ..devices import resolve_device
from ..errors import ArtifactError, ConfigError, InputDataError
from ..fileio import check_outputs_of, output_lock, read_h5ad, write_h5ad
from ..inference import check_batch_size, check_output_key, encoder_of
from ..readers import ReadOptions
from ..readers.cells import COUNT_INPUTS, H5AD, count_format, input_obs, read_cells
from ..sharding import (
    DEFAULT_TIMEOUT_S,
    ShardJob,
    ShardRole,
    cells_tokenize_config,
    merge,
    output_frame,
    rank_device,
    remove_shards,
    run_shard,
    shard_role,
    untokenized_shard,
    write_prediction_columns,
)
from ..tokenize import species_counts
from .finetune import FittedClassifier, load_classifier
from .tasks import tokenize_cells

if TYPE_CHECKING:
    import datasets

    from ..tokenize import TokenizeConfig

__all__ = ["merge_predict_shards", "predict_cells", "predict_file", "predict_sharded", "write_prediction_file"]


def predict_cells(fitted: FittedClassifier, data: ad.AnnData | datasets.Dataset, *,
                  tokenize_config: TokenizeConfig | None = None, batch_size: int = 64,
                  device: str | None = None) -> tuple[np.ndarray, int]:
    """Class probabilities of every cell of an AnnData (tokenized with the classifier's vocabulary
    and medians, and the tokenize options it was trained with unless ``tokenize_config`` is given) or
    of a tokenized corpus: ((n_cells, n_classes) float32, NaN rows for cells the tokenizer dropped;
    number dropped). A :class:`bundle.TokenizeOverrides` sets only its options over the classifier's."""
    probabilities, dropped, _ = _predict_counted(fitted, data, tokenize_config=tokenize_config, batch_size=batch_size,
                                                 device=device)
    return probabilities, dropped


def _predict_counted(fitted: FittedClassifier, data: ad.AnnData | datasets.Dataset, *, tokenize_config: TokenizeConfig | None,
                     batch_size: int, device: str | None) -> tuple[np.ndarray, int, dict[str, int] | None]:
    """:func:`predict_cells`, with the cells per species it classified (for the output's record)."""
    if hasattr(data, "obs") and hasattr(data, "var"):
        tokenize_config = resolve_tokenize_config(tokenize_config, fitted.tokenize_config)
        tokens = tokenize_cells(data, fitted.vocab, fitted.medians, tokenize_config,
                                int(encoder_of(fitted.model).config.max_position_embeddings))
        dataset, rows, n = tokens.dataset, tokens.rows, data.n_obs
    elif hasattr(data, "column_names"):
        dataset, rows, n = data, np.arange(len(data)), len(data)
    else:
        raise ConfigError(
            f"data must be an AnnData or a tokenized corpus (datasets.Dataset), got {type(data).__name__}; for a "
            "file or corpus folder read it first (anndata.read_h5ad / corpus.load_corpus) or use predict_file."
        )
    probabilities = np.full((n, len(fitted.classes)), np.nan, dtype=np.float32)
    probabilities[rows] = fitted.predict(dataset, batch_size=batch_size, device=device).probabilities
    return probabilities, int(n - len(np.unique(rows))), species_counts(dataset)


# long: a 9-line docstring; the checks before any work, the shard's compute step and the one-process run.
def predict_sharded(
    input: str | os.PathLike,
    classifier: str | os.PathLike,
    out: str | os.PathLike,
    *,
    role: ShardRole,
    key: str = "predicted",
    batch_size: int = 64,
    device: str | None = None,
    tokenize_config: TokenizeConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> ad.AnnData | None:
    """Classify ``input`` (a count input, read by :func:`readers.cells.read_cells` with the tokenize
    options' reader options, or a corpus folder) with a saved fine-tuned classifier.

    One process (``role.world == 1``): classify everything and return the AnnData. Several: like
    :func:`mixgeneformer.embed.embed_sharded`, the merged AnnData on the merging process and None elsewhere.
    Writes obs[KEY_pred], obs[KEY_prob], obsm[KEY_probabilities], uns[KEY_classes] and uns[KEY_params];
    where the input holds any of them already that is an error unless ``overwrite``. A corpus folder
    must have been tokenized with the classifier's vocabulary, and is refused with ``tokenize_config``.
    A shard none of whose cells holds a vocabulary gene gets NaN rows (:func:`sharding.untokenized_shard`).
    """
    input, out = Path(input), Path(out)
    check_batch_size(batch_size)
    kind = count_format(input) if input.exists() else H5AD
    if kind is None:
        refuse_tokenize_options(input, "predict", tokenize_config=tokenize_config)
    check_prediction_keys(input, key, overwrite)
    device = rank_device(device)
    resolve_device(device)  # a bad --device is refused before any work
    fitted = load_classifier(classifier)
    read = None
    if kind is None:
        check_corpus_vocabulary(input, fitted.vocab.hash)
    else:
        tokenize_config = resolve_tokenize_config(tokenize_config, fitted.tokenize_config)
        read = tokenize_config.read_options if tokenize_config is not None else ReadOptions()
    if kind not in (None, H5AD):  # its obs columns are known once its reader options are
        check_prediction_keys(input, key, overwrite, read)
    cells_config = cells_tokenize_config(input, tokenize_config)

    def compute(start: int, stop: int) -> dict[str, np.ndarray]:
        data = load_corpus(input).select(range(start, stop)) if kind is None else read_cells(input, read, (start, stop))
        probabilities, dropped, species = _predict_shard(fitted, data, key, tokenize_config=cells_config,
                                                         batch_size=batch_size, device=device)
        params = {"n_cells": stop - start, "n_dropped": dropped, "species": species}
        return {"values": probabilities, "classes": np.asarray(fitted.classes, dtype=str),
                "params": np.array(json.dumps(params))}

    if role.world == 1:
        adata = output_frame(input, read)
        data = load_corpus(input) if kind is None else adata
        probabilities, dropped, species = _predict_counted(fitted, data, tokenize_config=cells_config,
                                                           batch_size=batch_size, device=device)
        write_prediction_columns(adata, probabilities, list(fitted.classes), key)
        adata.uns[f"{key}_params"] = {"classifier": str(classifier), "n_cells": int(adata.n_obs), "n_dropped": dropped,
                                      **({"species": species} if species else {})}
        return adata
    options = {"tokenize": to_dict(tokenize_config) if tokenize_config is not None else None}
    job = ShardJob("predict", input, out, [input, Path(classifier)], options, {"key": key, "model": str(classifier)},
               tokenize_config)
    if not run_shard(job, role, compute, timeout_s, echo):
        return None
    return merge(out)[2]


def _predict_shard(fitted: FittedClassifier, data: ad.AnnData | datasets.Dataset, key: str, *,
                   tokenize_config: TokenizeConfig | None, batch_size: int,
                   device: str | None) -> tuple[np.ndarray, int, dict[str, int] | None]:
    """:func:`predict_cells` of one shard's cells. A shard none of whose cells the tokenizer keeps gets
    NaN rows (no label), as those cells get in a one-process run, all counted as dropped (the merge
    refuses an input without any tokenizable cell, as a one-process run does)."""
    try:
        return _predict_counted(fitted, data, tokenize_config=tokenize_config, batch_size=batch_size, device=device)
    except InputDataError as exc:
        n = len(data)
        if not untokenized_shard(exc, n, f"their rows of obsm[{key + '_probabilities'!r}]"):
            raise
        return np.full((n, len(fitted.classes)), np.nan, dtype=np.float32), n, None


def prediction_slots(key: str) -> dict[str, list[str]]:
    """What a prediction run writes under ``key``: obs columns, obsm and uns entries."""
    return {"obs": [f"{key}_pred", f"{key}_prob"], "obsm": [f"{key}_probabilities"],
            "uns": [f"{key}_classes", f"{key}_params"]}


def check_prediction_keys(input: Path, key: str, overwrite: bool, read: ReadOptions | None = None) -> None:
    """``key`` is a valid output key, and (unless ``overwrite``) the input holds none of the entries a
    prediction under it writes (as ``mixgf embed`` refuses an existing obsm[KEY] without --overwrite).
    A count input other than an h5ad is looked at with the reader options ``read`` (its obs columns and a
    loom's 2-D column attributes, read as obsm), and only when they are given."""
    check_output_key(key)
    if overwrite or not input.exists():
        return
    kind = count_format(input)
    if kind is None:
        present = {"obs": set(load_corpus(input).column_names), "obsm": set(), "uns": set()}
    elif kind == H5AD:
        present = _h5ad_keys(input)
    elif read is None:
        return
    else:
        _, columns, obsm = input_obs(input, read)
        present = {"obs": set(columns), "obsm": set(obsm), "uns": set()}
    taken = [f"{slot}[{name!r}]" for slot, names in prediction_slots(key).items() for name in names if name in present[slot]]
    if taken:
        raise ConfigError(
            f"the input {input} already holds {', '.join(taken)}; pass --overwrite (API: overwrite=True) to replace "
            "them, or choose another --key"
        )


def _h5ad_keys(path: Path) -> dict[str, set[str]]:
    """The obs columns, obsm and uns keys of an h5ad file, read from its HDF5 groups (no data loaded)."""
    try:
        with h5py.File(path, "r") as handle:
            group = {name: handle[name] for name in ("obs", "obsm", "uns") if isinstance(handle.get(name), h5py.Group)}
            return {
                "obs": {str(c) for c in group["obs"].attrs.get("column-order", [])} if "obs" in group else set(),
                "obsm": set(group["obsm"].keys()) if "obsm" in group else set(),
                "uns": set(group["uns"].keys()) if "uns" in group else set(),
            }
    except OSError:
        read_h5ad(path, "input h5ad", backed="r")  # says what is wrong with the file
        raise


def predict_file(
    input: str | os.PathLike,
    classifier: str | os.PathLike,
    out: str | os.PathLike,
    *,
    key: str = "predicted",
    batch_size: int = 64,
    device: str | None = None,
    tokenize_config: TokenizeConfig | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    config_files: Sequence[str | os.PathLike | None] = (),
) -> ad.AnnData | None:
    """``mixgf predict``: check the output first, then classify ``input`` in one process or this
    process' shard (:func:`predict_sharded`). Returns the AnnData for :func:`write_prediction_file`
    on the process that writes; None on the others. ``config_files``: other files the run read (e.g.
    the ``--tokenize-config`` YAML), which the output may not replace. ``overwrite`` replaces OUT and
    the input's own entries under ``key`` (:func:`check_prediction_keys`)."""
    input = Path(input)
    check_outputs_of({"--out": (out, {".h5ad"})}, [input, classifier, *config_files], overwrite)
    if not input.exists():
        raise ArtifactError(f"input {input} does not exist; give {COUNT_INPUTS}, or a tokenized corpus folder")
    return predict_sharded(
        input, classifier, out, role=shard_role(shard_index, num_shards), key=key, batch_size=batch_size,
        device=device, tokenize_config=tokenize_config, timeout_s=timeout_s, overwrite=overwrite, echo=echo,
    )


def write_prediction_file(adata: ad.AnnData, out: str | os.PathLike, key: str) -> str:
    """Write OUT.h5ad and drop OUT.shards/; returns the line to report (the commonest classes)."""
    write_h5ad(adata, out)
    remove_shards(out)
    counts = adata.obs[f"{key}_pred"].value_counts()
    counts = counts[counts > 0]  # a categorical column lists every class, predicted or not
    return f"wrote {out}: obs[{key + '_pred'!r}] " + ", ".join(f"{c} {n:,}" for c, n in counts.head(8).items())


def merge_predict_shards(out: str | os.PathLike) -> str:
    """``mixgf predict-merge``: the shards of a sharded prediction run merged into OUT (under OUT's lock)."""
    with output_lock(out):
        _, record, adata, _ = merge(out, "predict")
        return write_prediction_file(adata, out, record["key"])
