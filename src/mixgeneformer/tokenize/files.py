"""Tokenizing files into a corpus folder: cell-range tasks in worker processes, resume, assembly."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from .. import __version__
from ..config import save_config, to_dict
from ..corpus import CORPUS_JSON
from ..errors import (
    ArtifactError,
    ConfigError,
    GeneIdError,
    InputDataError,
    check_config,
    name_list,
    species_for_every_input,
)
from ..fileio import (
    atomic_directory,
    check_output,
    check_readable_file,
    content_hash,
    files_signature,
    output_lock,
    read_json,
    write_json,
    writing,
)
from ..medians import GeneMedians, compute_file_medians
from ..parallel import worker_pool
from ..readers import check_distinct_inputs
from .config import TokenizeConfig
from .encode import (
    TokenizeReport,
    _check_not_empty,
    _check_species_tokens,
    _check_vocab,
    _features,
    _iter_tables,
    _medians_for,
    warn_low_counts_coverage,
)
from .obs import _check_obs_names, _common_obs_types, _obs_arrow_types

if TYPE_CHECKING:
    from ..vocab import Vocabulary

logger = logging.getLogger(__name__)


def _tokenize_task(
    item: Any, start: int, stop: int, shard_path: str, vocab: Any, medians: GeneMedians, config: TokenizeConfig,
    obs_columns: Sequence[str], obs_types: dict[str, pa.DataType],
) -> dict[str, Any]:
    """Tokenize cells [start, stop) of one input into an Arrow shard (runs in a worker process)."""

    started = time.perf_counter()
    report = TokenizeReport()
    tmp = f"{shard_path}.tmp-{os.getpid()}"
    coverage, species = "", ""
    writer = ArrowWriter(features=_features(obs_types), path=tmp)
    finished = False
    try:
        for table, part, columns in _iter_tables(item, vocab, medians, config, obs_columns, obs_types, start, stop):
            if table.num_rows:
                writer.write_table(table)
            report.add(part)
            coverage, species = columns.coverage, columns.species
        writer.finalize()
        finished = True
    finally:
        writer.close()
        if not finished:
            Path(tmp).unlink(missing_ok=True)
    os.replace(tmp, shard_path)
    report.seconds = time.perf_counter() - started
    result = {**dataclasses.asdict(report), "coverage": coverage, "species": species, "start": start, "stop": stop}
    write_json(f"{shard_path}.json", result)  # written last: marks the shard complete
    return result


def _input_fingerprint(item: Any) -> dict[str, Any]:
    """An input's path and the size and mtime of each of its files (a 10x or SOMA folder: every file in it)."""
    return {"path": str(Path(item).resolve()), "files": files_signature([item])}


def _check_inputs_unchanged(items: list[Path], manifest: dict[str, Any]) -> None:
    """InputDataError naming an input that changed since the run was planned: its shards would hold
    cells of two versions of it."""
    changed = [item for item, recorded in zip(items, manifest["inputs"], strict=True) if _input_fingerprint(item) != recorded]
    if changed:
        raise InputDataError(
            f"{changed[0]} changed while it was being tokenized (a file's size or modification time differs), so the "
            "corpus would mix cells of two versions of it. Rerun once nothing writes to it any more."
        )


def run_manifest(
    items: Sequence[str | os.PathLike], vocab_hash: str, medians_hash: str, config: TokenizeConfig, obs_columns: Sequence[str]
) -> dict[str, Any]:
    """What identifies a tokenization run; a partial folder is resumed only when this matches."""
    return {
        "package": __version__,  # shards of another version of the tokenizer are not mixed in
        "vocab_hash": vocab_hash,
        "medians_hash": medians_hash,
        "config": to_dict(config),
        "obs_columns": list(obs_columns),
        "inputs": [_input_fingerprint(p) for p in items],
    }


# long: plan the tasks, then run them under the output lock; the steps share the task list and the manifest.
def tokenize_files(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab: Vocabulary,
    medians: GeneMedians | None,
    config: TokenizeConfig | None = None,
    obs_columns: Sequence[str] = (),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Tokenize many files (human and mouse may be mixed) into one corpus folder.

    Each input is split into ranges of ``config.task_cells`` cells; ``workers`` processes turn the
    ranges into Arrow shards inside ``.<out>.partial/`` beside ``out_dir``. A run interrupted and
    started again with the same inputs, vocabulary, medians and config skips the finished shards.
    The corpus appears atomically: ``save_to_disk`` layout (loadable with
    ``datasets.load_from_disk``), ``config.yaml`` and ``mixgf_corpus.json`` (vocabulary and median
    hashes, per-input coverage, dropped-cell counts).

    ``paths``: the input files (one path or a list); ``vocab`` / ``medians``: the vocabulary and gene
    medians (None only with ``config.medians="per_file"``); ``obs_columns``: obs columns carried into
    the corpus (one name or a list); ``workers``: processes; ``overwrite``: replace an existing
    ``out_dir`` (only once the new corpus is complete); ``progress``: show a progress bar.

    Returns
    -------
    Path
        ``out_dir``.
    """
    check_config(config, TokenizeConfig)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    config = config or TokenizeConfig()
    _check_vocab(vocab, config, medians)
    out_dir = check_output(out_dir, paths, overwrite=overwrite)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.is_file():
        raise ArtifactError(f"{partial} is a file, where tokenize keeps the shards of an unfinished run; move or delete "
                            "it, then rerun.")
    if not paths:
        raise InputDataError("no input files given.")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}.")
    items = [check_readable_file(p, "count matrix") for p in paths]
    check_distinct_inputs(items)
    obs_columns = name_list(obs_columns, "obs_columns")
    _check_obs_names(obs_columns)
    started = time.perf_counter()

    # Plan: open every input once (fails fast on missing layers / obs columns / gene IDs).
    tasks: list[tuple[int, int, int]] = []
    input_types: list[dict[str, pa.DataType]] = []  # an obs column may be typed differently in two inputs
    for index, item in enumerate(items):
        with config.read_options.open(item) as source:
            source.check_obs_columns(obs_columns)
            try:
                species = config.read_options.map_genes(source, vocab.gene_to_id).species
            except GeneIdError as error:
                raise species_for_every_input(error, len(items), config.read_options.species) from error
            _check_species_tokens(source.name, (species,), vocab, config)  # before any shard (mixed inputs: per task)
            input_types.append(_obs_arrow_types(source, obs_columns))
            n_cells = source.n_cells
        tasks.extend((index, lo, min(lo + config.task_cells, n_cells)) for lo in range(0, max(n_cells, 1), config.task_cells))

    obs_types = _common_obs_types(input_types)
    if _medians_for(None, medians, config) is None:  # per_file
        per_file = compute_file_medians(items, workers=workers, read=config.read_options, vocabulary_ids=vocab.gene_to_id)
        medians_hash = content_hash(*[m.hash for m in per_file])
    else:
        per_file = [medians] * len(items)
        medians_hash = medians.hash

    manifest = run_manifest(items, vocab.hash, medians_hash, config, obs_columns)
    # One writer per output; the partial folder is only looked at under the lock.
    with output_lock(out_dir), writing(out_dir):
        try:
            _run_tasks(out_dir, partial, items, tasks, per_file, manifest, vocab, config, obs_columns, obs_types,
                       workers, overwrite, progress, started)
        except InputDataError:
            shutil.rmtree(partial, ignore_errors=True)  # bad data: nothing a rerun could reuse
            raise
        except BaseException:
            kept = len(list(partial.glob("shard-*.arrow.json")))
            if not kept:
                shutil.rmtree(partial, ignore_errors=True)  # no finished shard to resume from
            else:  # an interrupt (or a failure) says what was kept and how to continue
                logger.warning("tokenize stopped: %d of %d tasks had finished; they are kept in %s. Run the same "
                               "command again to resume.", kept, len(tasks), partial)
            raise
    return out_dir


def _finished_shard(shard: Path) -> dict[str, Any] | None:
    """The report of a shard an earlier run finished; None (the task is redone) when its marker or its
    Arrow file is missing or unreadable, or the file holds fewer rows than the marker counts (cut short)."""
    marker = Path(f"{shard}.json")
    if not (marker.is_file() and shard.is_file()):
        return None
    try:
        result = read_json(marker, "shard report")
        with pa.memory_map(str(shard)) as source:
            rows = sum(batch.num_rows for batch in pa.ipc.open_stream(source))
    except (OSError, pa.ArrowInvalid):  # ArtifactError (a corrupt marker) is an OSError
        return None
    return result if isinstance(result, dict) and rows == result.get("cells_out") else None


# long: resume, run tasks (in process or a pool), report, assemble, in order.
def _run_tasks(
    out_dir: Path, partial: Path, items: list[Path], tasks: list[tuple[int, int, int]], per_file: list[GeneMedians],
    manifest: dict[str, Any], vocab: Any, config: TokenizeConfig, obs_columns: list[str], obs_types: dict[str, pa.DataType],
    workers: int, overwrite: bool, progress: bool, started: float,
) -> None:
    """Tokenize the planned tasks into shards in ``partial`` (resuming finished ones), then assemble."""
    manifest_path = partial / "manifest.json"
    if partial.exists():
        previous = read_json(manifest_path, "partial-run manifest") if manifest_path.exists() else None
        if previous != manifest:
            logger.warning("discarding %s: it belongs to a run with other inputs or settings", partial)
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(manifest_path, manifest)

    def shard_path(task: tuple[int, int, int]) -> Path:
        return partial / f"shard-{task[0]:05d}-{task[1]:012d}.arrow"

    results: dict[tuple[int, int, int], dict[str, Any]] = {}
    todo = []
    for task in tasks:
        finished = _finished_shard(shard_path(task))
        if finished is not None:
            results[task] = finished
        else:
            todo.append(task)
    if len(results):
        logger.info("resuming: %d of %d tasks already done", len(results), len(tasks))

    total_cells = sum(hi - lo for _, lo, hi in tasks)
    bar = tqdm(total=total_cells, initial=sum(hi - lo for (_, lo, hi) in results), desc="tokenize", unit="cells", disable=not progress)
    try:
        args = [(str(items[t[0]]), t[1], t[2], str(shard_path(t)), vocab, per_file[t[0]], config, obs_columns, obs_types) for t in todo]
        if workers > 1 and len(todo) > 1:
            with worker_pool(workers) as pool:
                futures = {pool.submit(_tokenize_task, *a): t for a, t in zip(args, todo, strict=True)}
                for future in as_completed(futures):  # a failed task or a signal cancels the queued ones
                    task = futures[future]
                    results[task] = future.result()
                    bar.update(task[2] - task[1])
        else:
            for a, task in zip(args, todo, strict=True):
                results[task] = _tokenize_task(*a)
                bar.update(task[2] - task[1])
    finally:
        bar.close()

    _check_inputs_unchanged(items, manifest)
    report = TokenizeReport()
    for task in tasks:
        report.add(TokenizeReport(**{k: v for k, v in results[task].items() if k in TokenizeReport.__dataclass_fields__ and k not in ("inputs", "seconds")}))
    report.seconds = time.perf_counter() - started
    for index, item in enumerate(items):
        mine = [results[t] for t in tasks if t[0] == index]
        report.inputs.append({
            "path": str(item),
            "species": mine[0]["species"],
            "coverage": mine[0]["coverage"],
            "cells_in": sum(r["cells_in"] for r in mine),
            "cells_out": sum(r["cells_out"] for r in mine),
            "dropped_zero_counts": sum(r["dropped_zero_counts"] for r in mine),
            "dropped_no_vocab_gene": sum(r["dropped_no_vocab_gene"] for r in mine),
            "dropped_filter_pass": sum(r["dropped_filter_pass"] for r in mine),
            **{key: sum(r.get(key, 0) for r in mine) for key in ("cells_human", "cells_mouse")},
            "counts": sum(r.get("counts", 0.0) for r in mine),
            "counts_in_vocabulary": sum(r.get("counts_in_vocabulary", 0.0) for r in mine),
        })
        warn_low_counts_coverage(str(item), report.inputs[-1]["counts"], report.inputs[-1]["counts_in_vocabulary"],
                                 config.min_coverage)
    _check_not_empty(report, ", ".join(map(str, items)))
    _assemble_corpus(out_dir, [shard_path(t) for t in tasks if results[t]["cells_out"] > 0], obs_types, config, manifest, report, overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("tokenize: %s", report.summary())


def _assemble_corpus(
    out_dir: Path, shards: list[Path], obs_types: dict[str, pa.DataType], config: TokenizeConfig,
    manifest: dict[str, Any], report: TokenizeReport, overwrite: bool,
) -> None:
    """Write the ``save_to_disk`` layout from finished shards without copying their data."""


    features = _features(obs_types)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
        for shard, name in zip(shards, names, strict=True):
            try:
                os.link(shard, tmp / name)  # the partial folder is removed only after success
            except OSError:
                shutil.copyfile(shard, tmp / name)
        state = {
            "_data_files": [{"filename": n} for n in names],
            "_fingerprint": content_hash(json.dumps(manifest, sort_keys=True)),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        with open(tmp / "state.json", "w") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
        info = dataclasses.asdict(datasets.DatasetInfo(description=report.summary(), features=features))
        info["features"] = features.to_dict()
        with open(tmp / "dataset_info.json", "w") as handle:
            json.dump({k: info[k] for k in sorted(info)}, handle, indent=2, default=str)
        save_config(config, tmp)
        write_json(tmp / CORPUS_JSON, {
            "format": "mixgeneformer-corpus-v1",
            "vocab_hash": manifest["vocab_hash"],
            "medians_hash": manifest["medians_hash"],
            "obs_columns": manifest["obs_columns"],
            **{k: v for k, v in dataclasses.asdict(report).items()},
        })
        # Verify the folder loads before it becomes visible.
        loaded = datasets.load_from_disk(str(tmp))
        if len(loaded) != report.cells_out:
            raise InputDataError(f"corpus check failed: {len(loaded)} rows written, {report.cells_out} expected.")
        del loaded
