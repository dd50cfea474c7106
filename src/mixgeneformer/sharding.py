"""Inference sharded over processes, GPUs and nodes: ``mixgf embed`` and ``mixgf predict``.

One job of ``W`` processes (``torchrun`` / ``accelerate launch`` set ``RANK`` / ``WORLD_SIZE``), or
``W`` separate jobs given ``--shard-index`` / ``--num-shards``, embeds (or classifies) one input:

* :func:`plan_shards` cuts the input's cells into ``W`` contiguous ranges holding about the same
  number of tokens (each range is read with row slices; the ranges differ by at most one cell's
  length in tokens). The plan is a pure function of the cell lengths and ``W``.
* Each process computes its range with the one-process API (:func:`embed.embed_anndata`,
  :func:`embed.embed_corpus_folder`, :meth:`classify.FittedClassifier.predict`; the user APIs
  :func:`embed.embed_sharded` and :func:`classify.predict.predict_sharded` call :func:`run_shard`) and writes one
  shard file atomically into ``OUT.shards/`` (beside the output). A shard records the fingerprint
  of its inputs (input and model files: paths, sizes, modification times; the options that change
  the numbers; the plan), so a rerun reuses the shards that match and recomputes only the others.
* Under a launcher the processes meet at a barrier (gloo process group, ``timeout_s``) and rank 0
  merges; separate jobs are merged by ``mixgf embed-merge OUT`` / ``mixgf predict-merge OUT``.
  :func:`merge` assembles one AnnData in the input's obs order, equal to a one-process run (a
  cell's embedding does not depend on its batch).

A rank that raises ends the launch (``torchrun`` stops the other ranks of a failed job; a rank
waiting at the barrier also sees a lost peer's closed connection), and ``timeout_s`` bounds a rank
that hangs. Test hooks: ``MIXGF_TEST_FAIL_SHARD="<index>"`` makes that shard raise once every other
shard file exists (a rank killed after the others finished); ``MIXGF_TEST_HANG_SHARD="<index>"``
makes it hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch.distributed as dist

from .bundle import TokenizeOverrides, bundle_tokenize_config, resolve_tokenize_config
from .corpus import load_corpus
from .errors import ArtifactError, ConfigError, InputDataError, NoTokenizableCellError
from .fileio import (
    JSONValue,
    atomic_file,
    content_hash,
    files_signature,
    read_json,
    write_json,
)
from .parallel import rank_device
from .readers import ReadOptions, open_source
from .readers.cells import H5AD, count_format, read_cells, read_rows
from .tokenize import load_tokenize_config

if TYPE_CHECKING:
    from .tokenize import TokenizeConfig

Kind = Literal["embed", "predict"]
MANIFEST = "manifest.json"
#: Default barrier / process-group timeout: a rank whose shard was reused waits at the barrier
#: for the slowest rank, so this bounds only a rank that hangs (a failing rank ends the job at once).
DEFAULT_TIMEOUT_S = 86_400
_LENGTH_CHUNK = 65_536

__all__ = [
    "ShardJob",
    "ShardRole",
    "cell_lengths",
    "cells_tokenize_config",
    "merge",
    "model_tokenize_config",
    "output_frame",
    "plain_record",
    "plan_shards",
    "rank_device",
    "read_rows",
    "remove_shards",
    "run_shard",
    "shard_folder",
    "shard_role",
    "untokenized_shard",
    "write_prediction_columns",
]


# --------------------------------------------------------------------------------------------
# Who am I, and which cells are mine
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardRole:
    """This process' shard. ``launched``: one of the processes of a ``torchrun`` / ``accelerate``
    launch (they meet at a barrier and rank 0 merges); else a separate job or a one-process run."""

    index: int
    world: int
    launched: bool

    @property
    def merges(self) -> bool:
        return self.launched and self.index == 0


def shard_role(shard_index: int | None = None, num_shards: int | None = None) -> ShardRole:
    """The shard of this process: explicit ``shard_index`` / ``num_shards``, else ``RANK`` /
    ``WORLD_SIZE`` of a launcher, else the whole input (0 of 1)."""
    if (shard_index is None) != (num_shards is None):
        raise ConfigError("give both --shard-index and --num-shards, or neither")
    if num_shards is not None:
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ConfigError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
        return ShardRole(int(shard_index), int(num_shards), False)
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"RANK / WORLD_SIZE must be integers ({exc})") from exc
    if not 0 <= rank < world:
        raise ConfigError(f"environment RANK={rank} is not within WORLD_SIZE={world}")
    return ShardRole(rank, world, world > 1)


def plan_shards(lengths: np.ndarray, world: int) -> np.ndarray:
    """Cut cells into ``world`` contiguous ranges of about equal token count.

    Parameters
    ----------
    lengths
        Tokens of each cell, in input order (cells count at least one token each).
    world
        Number of shards.

    Returns
    -------
    numpy.ndarray
        ``world + 1`` int64 bounds: shard ``i`` holds cells ``bounds[i]:bounds[i + 1]``. Every cut
        lies at the cell boundary nearest to ``i / world`` of the cumulative tokens, so two shards
        differ by at most about one cell's length; ranges are disjoint and cover every cell.
    """
    if world < 1:
        raise ConfigError(f"the number of shards must be at least 1, got {world}")
    weights = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    if weights.size == 0:  # no cells: every shard empty (indexing `ends` below needs one cell)
        return np.zeros(world + 1, dtype=np.int64)
    ends = np.cumsum(weights)
    total = int(ends[-1])
    targets = total * np.arange(1, world, dtype=np.float64) / world
    after = np.searchsorted(ends, targets, side="left")  # first cell whose end reaches the target
    before_end = np.where(after > 0, ends[np.maximum(after - 1, 0)], 0)
    at_end = ends[np.minimum(after, len(ends) - 1)]
    cuts = np.where(targets - before_end <= at_end - targets, after, after + 1)
    cuts = np.maximum.accumulate(np.clip(cuts, 0, len(weights)))
    return np.concatenate([[0], cuts, [len(weights)]]).astype(np.int64)


def cell_lengths(input: Path, tokenize_config: TokenizeConfig | None = None, gene_column: str | None = None) -> np.ndarray:
    """Tokens per cell of an input, for :func:`plan_shards` (no tokenization).

    A corpus folder: its ``length`` column (else the ``input_ids`` lengths). A count input (any format
    :func:`readers.open_source` reads, with the configuration's reader options): the expressed genes of
    each cell (before the vocabulary filter) capped at ``max_len``; from a CSR ``.h5ad`` its row pointer
    alone, so that each rank of a sharded run does not read every count. ``gene_column`` (``mixgf embed
    --gene-column``) replaces the configuration's for an input other than an h5ad, as the shards read it
    (a loom without a default gene attribute opens only with it).
    """
    input = Path(input)
    kind = count_format(input)
    if kind is None:
        corpus = load_corpus(input)
        if "length" in corpus.column_names:
            return np.asarray(corpus.with_format("numpy")["length"], dtype=np.int64)
        ids = corpus.select_columns(["input_ids"]).with_format("arrow")
        parts = [
            np.asarray(pc.list_value_length(ids[i : i + _LENGTH_CHUNK].column("input_ids")), dtype=np.int64)
            for i in range(0, len(corpus), _LENGTH_CHUNK)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    read = tokenize_config.read_options if tokenize_config is not None else ReadOptions()
    max_len = int(getattr(tokenize_config, "max_len", 2048))
    other = kind != H5AD  # an h5ad's obs_filter is refused where it is tokenized, as in one process
    genes = gene_column if other and gene_column is not None else read.gene_column
    with open_source(input, layer=read.layer, gene_column=genes, allow_fractional=True,
                     measurement=read.measurement, obs_filter=read.obs_filter if other else None) as source:
        # another format reads dense slabs (loom) or whole rows: the chunk its shards are read in, not 65,536 cells
        return np.minimum(source.stored_per_cell(read.chunk_size if other else _LENGTH_CHUNK), max_len)


def model_tokenize_config(model: str | os.PathLike | object, given: TokenizeConfig | None) -> TokenizeConfig | None:
    """The tokenize options a model command uses with ``model`` (a bundle folder, or a loaded model):
    ``given`` over the bundle's recorded ones (:func:`bundle.resolve_tokenize_config`), known before the
    model loads; a count input other than an h5ad is read with their reader options."""
    recorded = (bundle_tokenize_config(model) if isinstance(model, (str, os.PathLike))
                else getattr(model, "bundle_tokenize_config", None))
    return resolve_tokenize_config(given, recorded)


def cells_tokenize_config(input: Path, config: TokenizeConfig | None) -> TokenizeConfig | None:
    """The tokenize options for the cells :func:`readers.cells.read_cells` read from ``input``: ``config``
    itself for an h5ad or a corpus (applied to them as before), without its ``obs_filter`` for any other
    input (the reader applied it to a SOMA experiment's cells and refused it for other formats)."""
    if config is None or config.obs_filter is None or count_format(input) in (None, H5AD):
        return config
    if isinstance(config, TokenizeOverrides):
        return TokenizeOverrides(**{name: value for name, value in config.options().items() if name != "obs_filter"})
    return dataclasses.replace(config, obs_filter=None)


# --------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------
def shard_folder(out: str | os.PathLike) -> Path:
    """Where the shards of the output ``out`` live: ``OUT.shards/`` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.shards"


def _shard_path(folder: Path, index: int, world: int) -> Path:
    return folder / f"shard-{index:05d}-of-{world:05d}.npz"


def _fingerprint(*parts: Any) -> str:
    return content_hash(json.dumps(parts, sort_keys=True, default=str))


def _write_shard(path: Path, fingerprint: str, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
    with atomic_file(path, "wb") as handle:
        np.savez(handle, fingerprint=np.array(fingerprint), start=np.int64(start), stop=np.int64(stop), **arrays)


def _read_shard(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The arrays of a finished shard with this fingerprint; None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # truncated or corrupt: recomputed
    if str(arrays.get("fingerprint")) != fingerprint:
        return None
    return arrays


def remove_shards(out: str | os.PathLike) -> None:
    """Delete ``OUT.shards/`` once the merged output is written."""
    shutil.rmtree(shard_folder(out), ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Running one shard, the barrier, the merge
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardJob:
    kind: Kind
    input: Path
    out: Path
    sources: list[Path]  # files whose change makes every shard stale (input, model, ...)
    options: dict[str, Any]  # what changes the numbers
    record: dict[str, Any]  # what the merge needs (key, model name, CLI extras)
    tokenize_config: Any = None

    def manifest(self, world: int, bounds: np.ndarray) -> dict[str, Any]:
        signature = files_signature(self.sources)
        return {
            "kind": self.kind,
            "input": str(self.input.resolve()),
            "world": int(world),
            "bounds": [int(b) for b in bounds],
            "fingerprint": _fingerprint(self.kind, signature, self.options, int(world), [int(b) for b in bounds]),
            "sources": [str(Path(p).resolve()) for p in self.sources],  # a merge may run elsewhere
            "signature": signature,
            "options": self.options,
            "record": self.record,
        }


def run_shard(job: ShardJob, role: ShardRole, compute: Callable[[int, int], dict[str, np.ndarray]], timeout_s: float,
         echo: Callable[[str], None]) -> bool:
    """Compute (or reuse) this process' shard; True when this process must now merge. A process group
    this call created is destroyed when the shard fails (peers at the barrier see the loss at once)."""
    own_group = _join_group(timeout_s) if role.launched else None
    try:
        return _run_shard(job, role, compute, own_group, timeout_s, echo)
    except BaseException:
        if own_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        raise


def _run_shard(job: ShardJob, role: ShardRole, compute: Callable[[int, int], dict[str, np.ndarray]],
               group: bool | None, timeout_s: float, echo: Callable[[str], None]) -> bool:
    lengths = cell_lengths(job.input, job.tokenize_config, job.options.get("gene_column"))
    if lengths.size == 0:  # as one process refuses it (no cell to tokenize), not an empty output
        raise InputDataError(f"{job.input} holds no cells; there is nothing to {job.kind}. Give an input with cells.")
    bounds = plan_shards(lengths, role.world)
    manifest = job.manifest(role.world, bounds)
    folder = shard_folder(job.out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MANIFEST, manifest)  # identical on every rank; written atomically
    start, stop = int(bounds[role.index]), int(bounds[role.index + 1])
    path = _shard_path(folder, role.index, role.world)
    where = f"shard {role.index + 1}/{role.world} (cells {start:,}-{stop:,})"
    if _read_shard(path, manifest["fingerprint"]) is not None:
        echo(f"{where}: reused {path}")
    else:
        _test_hook(role, folder, manifest["fingerprint"])
        arrays = compute(start, stop) if stop > start else {}
        _write_shard(path, manifest["fingerprint"], start, stop, arrays)
        echo(f"{where}: computed -> {path}")
    if group is None:
        echo(f"when every shard is done: mixgf {job.kind}-merge {job.out}")
        return False
    _barrier(group, timeout_s)
    return role.merges


def untokenized_shard(exc: InputDataError, n_cells: int, rows: str) -> bool:
    """Whether ``exc`` is the tokenizer refusing a shard of ``n_cells`` cells none with a vocabulary gene (warns):
    the caller writes NaN ``rows``, as one process does; :func:`merge` refuses an input without any such cell."""
    if not isinstance(exc, NoTokenizableCellError):
        return False
    warnings.warn(f"none of the {n_cells} cells of this shard could be tokenized ({exc}); {rows} are NaN",
                  UserWarning, stacklevel=3)
    return True


def _join_group(timeout_s: float):
    """The launch's process group (a gloo group of our own when none exists yet)."""
    if dist.is_initialized():
        return False  # the caller's group: used, not destroyed
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _barrier(own_group: bool, timeout_s: float) -> None:
    try:
        dist.barrier()
    except RuntimeError as exc:
        raise ArtifactError(
            f"a rank failed or did not reach the end of its shard within {timeout_s:.0f} s ({exc}); "
            "rerun the same command: finished shards are reused"
        ) from exc
    if own_group:
        dist.destroy_process_group()


def _test_hook(role: ShardRole, folder: Path, fingerprint: str) -> None:
    if os.environ.get("MIXGF_TEST_HANG_SHARD") == str(role.index):
        time.sleep(3600)
    if os.environ.get("MIXGF_TEST_FAIL_SHARD") != str(role.index):
        return
    others = [_shard_path(folder, i, role.world) for i in range(role.world) if i != role.index]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(_read_shard(p, fingerprint) is not None for p in others):
        time.sleep(0.2)
    raise RuntimeError(f"injected failure on shard {role.index}")


def _complete_shards(out: Path) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """The manifest and every shard of ``out``; errors name what is missing or changed."""
    folder = shard_folder(out)
    if not (folder / MANIFEST).exists() and out.is_file():  # a merge that finished removes the shards
        raise ArtifactError(f"{out} is already merged: {folder} (its shards) was removed when it was written. "
                            "Nothing to merge; to compute it again, rerun the shards with --overwrite, then merge.")
    manifest = read_json(folder / MANIFEST, "shard manifest")
    if files_signature([Path(p) for p in manifest["sources"]]) != manifest["signature"]:
        raise ArtifactError(
            f"the input or model changed since the shards in {folder} were computed; rerun the command"
        )
    world = int(manifest["world"])
    shards = [_read_shard(_shard_path(folder, i, world), manifest["fingerprint"]) for i in range(world)]
    missing = [i for i, s in enumerate(shards) if s is None]
    if missing:
        raise ArtifactError(
            f"{len(missing)} of {world} shards are missing or stale in {folder} (indices {missing[:10]}); "
            "rerun the same command (finished shards are reused), then merge"
        )
    return manifest, shards  # type: ignore[return-value]


def _stack(shards: list[dict[str, np.ndarray]], n_cells: int) -> np.ndarray:
    """The shards' per-cell ``values`` in input order (shards cover 0..n_cells contiguously)."""
    filled = [s for s in shards if int(s["stop"]) > int(s["start"])]
    width = filled[0]["values"].shape[1] if filled else 0
    out = np.full((n_cells, width), np.nan, dtype=np.float32)
    for s in filled:
        out[int(s["start"]) : int(s["stop"])] = s["values"]
    return out


def output_frame(input: Path, read: ReadOptions | None = None, gene_column: str | None = None) -> ad.AnnData:
    """What a one-process run writes the results into: the input h5ad, the corpus' obs, or the cells of
    another count input read with the reader options ``read`` (:func:`readers.cells.read_cells`)."""
    if count_format(input) is None:
        corpus = load_corpus(input)
        meta = [c for c in corpus.column_names if c != "input_ids"]
        obs = corpus.select_columns(meta).to_pandas() if meta else pd.DataFrame(index=range(len(corpus)))
        obs.index = obs.index.astype(str)
        return ad.AnnData(obs=obs)
    return read_cells(input, read, gene_column=gene_column)


def merge(out: str | os.PathLike, kind: str | None = None) -> tuple[str, dict[str, Any], ad.AnnData, pd.DataFrame | None]:
    """Assemble the shards of ``out`` into one AnnData in the input's obs order.

    Returns (kind, record, adata, gene table or None): ``record`` holds what the command recorded
    for its outputs (key, model, CLI extras). Raises :class:`ArtifactError` when a shard is missing
    or stale, or the input / model changed since, and :class:`ConfigError` when ``kind`` is given
    and the shards are another command's (before assembling anything).
    """
    out = Path(out)
    manifest, shards = _complete_shards(out)
    if kind is not None and manifest["kind"] != kind:
        raise ConfigError(f"{out}.shards holds {manifest['kind']} shards; use mixgf {manifest['kind']}-merge")
    record, options = manifest["record"], manifest["options"]
    other = count_format(manifest["input"]) not in (None, H5AD)  # an h5ad or a corpus is read as always: no options
    read = load_tokenize_config(options["tokenize"]).read_options if other and options.get("tokenize") else None
    adata = output_frame(Path(manifest["input"]), read, options.get("gene_column"))
    values = _stack(shards, adata.n_obs)
    done = [s for s in shards if "params" in s]
    params = [json.loads(str(s["params"])) for s in done]
    embedded = [p for p, s in zip(params, done, strict=True)  # the shards with a tokenized cell
                if p.get("n_dropped", 0) < int(s["stop"]) - int(s["start"])]
    if params and not embedded:  # embed or predict: what a one-process run refuses
        raise InputDataError(
            f"none of the {adata.n_obs} cells of {manifest['input']} could be tokenized (no vocabulary gene; see "
            "each shard's warning); check the species, the gene IDs and that the matrix holds raw counts"
        )
    base = dict((embedded or params)[0]) if params else {}
    base.update(n_cells=int(adata.n_obs), n_dropped=int(sum(p.get("n_dropped", 0) for p in params)),
                shards=int(manifest["world"]))
    if species := sum((Counter(p.get("species") or {}) for p in params), Counter()):  # cells per species, all shards
        base["species"] = {name: int(n) for name, n in sorted(species.items())}
    genes = None
    if manifest["kind"] == "embed":
        key = record["key"]
        adata.obsm[key] = values
        base["model"] = record["model"]
        adata.uns[f"{key}_params"] = base
        if options.get("gene_embeddings"):
            genes = _merge_gene_tables(shards)
    else:
        classes = next(s["classes"] for s in shards if "classes" in s)
        write_prediction_columns(adata, values, [str(c) for c in classes], record["key"])
        adata.uns[f"{record['key']}_params"] = {**base, "classifier": record["model"]}
    return str(manifest["kind"]), record, adata, genes


def plain_record(value: object) -> JSONValue:
    """JSON-ready copy of a ``uns`` record (numpy scalars and arrays to Python)."""
    if isinstance(value, dict):
        return {k: plain_record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain_record(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _merge_gene_tables(shards: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """Mean contextual gene embeddings over every shard (count-weighted), sorted by token id."""
    parts = [s for s in shards if "gene_ids" in s]
    ids = np.concatenate([s["gene_ids"] for s in parts])
    names = np.concatenate([s["gene_names"] for s in parts])
    counts = np.concatenate([s["gene_counts"] for s in parts])
    sums = np.concatenate([s["gene_means"].astype(np.float64) * s["gene_counts"][:, None] for s in parts])
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    total = np.zeros((len(unique), sums.shape[1]))
    np.add.at(total, inverse, sums)
    n = np.bincount(inverse, weights=counts).astype(np.int64)
    index = pd.Index(names[first], name="gene")
    table = pd.DataFrame((total / n[:, None]).astype(np.float32), index=index,
                         columns=[f"dim_{j}" for j in range(sums.shape[1])])
    table.insert(0, "n_cells", n)
    return table


def write_prediction_columns(adata: ad.AnnData, probabilities: np.ndarray, classes: list[str], key: str) -> None:
    """obs[key_pred] (categorical, NaN for cells not classified), obs[key_prob], obsm[key_probabilities]."""
    done = np.isfinite(probabilities).all(axis=1)
    best = np.argmax(np.where(done[:, None], probabilities, 0), axis=1)
    labels = np.where(done, np.asarray(classes, dtype=object)[best], None)
    adata.obs[f"{key}_pred"] = pd.Categorical(labels, categories=classes)
    adata.obs[f"{key}_prob"] = np.where(done, probabilities[np.arange(len(best)), best], np.nan).astype(np.float32)
    adata.obsm[f"{key}_probabilities"] = probabilities
    adata.uns[f"{key}_classes"] = np.asarray(classes, dtype=object)
