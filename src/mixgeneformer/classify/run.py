"""One classification run: every method on every task, and its output folder."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np
import pandas as pd
import torch

from ..bundle import load_for_inference
from ..config import save_config, to_dict
from ..errors import ConfigError, check_anndata, check_config, name_list
from ..fileio import atomic_directory, write_h5ad, write_json
from ..medians import GeneMedians
from ..plots import confusion_matrix
from ..readers import ReadOptions
from ..tokenize import TokenizeConfig
from ..vocab import Vocabulary
from .baselines import baselines, token_baseline
from .config import BaselineMethod, ClassifyConfig, Method
from .finetune import FittedClassifier, check_finetune_options, finetune, refuse_finetune_max_len
from .metrics import EvalResult, benchmark_table, write_predictions
from .tasks import Task, _max_len_of, tokenize_task, transfer_task, within_task
from .zeroshot import zero_shot

if TYPE_CHECKING:
    import anndata

logger = logging.getLogger(__name__)


@dataclass
class ClassificationRun:
    """Results of every method run on one task (same train / test cells for all)."""

    task: Task
    results: list[EvalResult]
    config: ClassifyConfig
    fitted: FittedClassifier | None = None

    def table(self) -> pd.DataFrame:
        """The benchmark table of this run."""
        return benchmark_table(self.results)


MODEL_METHODS: tuple[str, ...] = tuple(sorted(get_args(Method)))
BASELINE_METHODS: tuple[str, ...] = tuple(sorted(get_args(BaselineMethod)))


def check_methods(model: object | None, methods: Sequence[str], baseline_methods: Sequence[str]) -> None:
    """Known method names, something to run, and a model for what needs one: checked before any cell is read."""
    for names, known, what in ((methods, MODEL_METHODS, "methods"), (baseline_methods, BASELINE_METHODS, "baseline_methods")):
        unknown = [name for name in names if name not in known]
        if unknown:  # refused here, not after the other methods have run (a fine-tuning can take minutes)
            raise ConfigError(f"{what} {unknown} not known: choose among {list(known)}.")
    if not methods and not baseline_methods:
        raise ConfigError("no method to run: give methods and / or baseline_methods (CLI: --mode, --baselines).")
    if methods and model is None:
        raise ConfigError(f"methods {list(methods)} need a model (CLI: --model BUNDLE); or run only baselines.")
    if "logreg_tokens" in baseline_methods and model is None:
        raise ConfigError("baseline logreg_tokens reads the model's tokens: it needs a model (CLI: --model BUNDLE).")


def _check_model_options(model: torch.nn.Module | None, methods: Sequence[Method], config: ClassifyConfig) -> None:
    """The options that need the model, checked before any cell is tokenized."""
    refuse_finetune_max_len(config.finetune)  # whatever the methods: refused, not ignored
    if "finetune" in methods:
        check_finetune_options(config.finetune, model)


# long: argument checks and a docstring of every parameter; the body is load, check, tokenize, each method in turn
def run_classification(
    adata: anndata.AnnData,
    model: str | os.PathLike | torch.nn.Module | None = None,
    vocab: Vocabulary | str | os.PathLike | None = None,
    medians: GeneMedians | str | os.PathLike | None = None,
    test: anndata.AnnData | None = None,
    methods: Sequence[Method] = ("knn", "logreg"),
    baseline_methods: Sequence[BaselineMethod] = (),
    config: ClassifyConfig | None = None,
    tokenize_config: TokenizeConfig | None = None,
    device: str | None = None,
    max_len: int | None = None,
) -> ClassificationRun:
    """Classify ``adata``'s cells (stratified split), or train on ``adata`` and test on ``test``.

    ``adata`` / ``test`` are AnnData objects with raw counts and the label column
    ``config.labels.key`` (default ``cell_type1``); neither is modified (:func:`write_predictions`
    writes a run's predictions into ``run.task.test_data``). ``methods``: model methods among
    ``"knn"``, ``"logreg"`` (zero-shot on frozen embeddings, ``config.embedding``) and ``"finetune"``
    (``config.finetune``); ``baseline_methods``: ``"logreg_counts"``, ``"knn_pca"`` (on counts,
    ``config.baselines``) and ``"logreg_tokens"`` (on the model's tokens). One name may be given as a
    string. ``device``: the torch device of every model method (fine-tuning on
``config.finetune.device`` instead where that is set).
    Returns a :class:`ClassificationRun` (``run.table()``, ``run.results``, ``run.fitted``).

    ``model`` is a model bundle folder or a loaded model, as for ``embed_anndata`` and
    ``perturb_anndata``: a folder supplies its vocabulary, medians and tokenize configuration
    (explicit ``vocab`` / ``medians`` / ``tokenize_config`` win); a loaded model needs ``vocab``.
    With ``test`` of another species, labels are matched by canonical name (see the module
    docstring) and count baselines use one-to-one-ortholog genes. ``config.labels.transfer_split``
    trains on ``adata``'s training split and tests on ``test``'s test split (each split as a
    within-dataset run of the same seed would split it). ``max_len`` replaces the tokenize
    configuration's: e.g. fine-tune on more genes per cell than the model was pretrained on, up to
    its ``max_position_embeddings`` (the positions beyond pretraining are learned while fine-tuning).
    Count baselines read the cells with the tokenize configuration's reader options (``layer``,
    ``gene_column``, ``allow_fractional``), as the tokenizer does.
    """
    check_anndata(adata)
    if test is not None:
        check_anndata(test, "test")
    check_config(config, ClassifyConfig)
    methods, baseline_methods = name_list(methods, "methods"), name_list(baseline_methods, "baseline_methods")
    if model is not None:
        model, vocab, medians, tokenize_config, _ = load_for_inference(model, vocab, medians, tokenize_config)
        if max_len is not None:
            tokenize_config = _with_max_len(tokenize_config, max_len, _max_len_of(model))

    config = config or ClassifyConfig()
    if device is not None and config.finetune.device is None:  # device= applied to zero-shot only before
        config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, device=device))
    check_methods(model, methods, baseline_methods)
    _check_model_options(model, methods, config)
    read = tokenize_config.read_options if tokenize_config is not None else None
    task, species = _task_of(adata, test, config, read)
    for note in task.notes:
        logger.info("%s", note)
    results: list[EvalResult] = []
    fitted = None
    model_methods = list(methods)  # names checked by check_methods
    if model_methods or "logreg_tokens" in baseline_methods:
        task, train_tokens, test_tokens = tokenize_task(task, vocab, medians, tokenize_config, _max_len_of(model))
        zero = [m for m in model_methods if m != "finetune"]
        if zero:
            results += zero_shot(task, model, vocab, medians, zero, config.embedding, device=device, tokens=(train_tokens, test_tokens))  # type: ignore[arg-type]
        if "finetune" in model_methods:
            result, fitted = finetune(task, model, vocab, medians, config, tokenize_config, tokens=(train_tokens, test_tokens))
            results.append(result)
        if "logreg_tokens" in baseline_methods:
            results.append(token_baseline(task, (train_tokens, test_tokens), len(vocab.tokens), vocab.special_ids,  # type: ignore[union-attr]
                                          config.baselines, ortholog_map=vocab.ortholog_map))  # type: ignore[union-attr]
    count_methods = [m for m in baseline_methods if m != "logreg_tokens"]
    if count_methods:
        results += baselines(task, count_methods, config.baselines, species=species, read=read)
    return ClassificationRun(task=task, results=results, config=config, fitted=fitted)


def _task_of(
    adata: anndata.AnnData, test: anndata.AnnData | None, config: ClassifyConfig, read: ReadOptions | None = None
) -> tuple[Task, tuple[str, str] | None]:
    """The within-dataset task, or the transfer task to ``test`` with the two files' species."""
    if test is None:
        return within_task(adata, config.labels), None
    species = (_species_of(adata, read), _species_of(test, read))
    setting = "transfer" if species[0] == species[1] else f"{species[0]}->{species[1]}"
    rows: dict[str, np.ndarray | None] = {"source_rows": None, "target_rows": None}
    if config.labels.transfer_split:
        rows = {
            "source_rows": within_task(adata, config.labels).train_rows,
            "target_rows": within_task(test, config.labels).test_rows,
        }
    return transfer_task(adata, test, config.labels, setting, synonyms=config.synonyms, **rows), species


def _species_of(adata: anndata.AnnData, read: ReadOptions | None) -> str:
    """The species of a file's genes as the tokenizer and the count baselines read them: the identifiers
    of ``read.gene_column`` (not ``var_names``), and ``read.species`` when declared (``"auto"``: detected)."""
    read = read or ReadOptions()
    with read.open(adata) as source:
        return read.map_genes(source).species


def _with_max_len(config: TokenizeConfig | None, max_len: int, positions: int) -> TokenizeConfig:
    if max_len > positions:
        raise ConfigError(
            f"max_len={max_len} exceeds the model's {positions} positions (max_position_embeddings); use at most {positions}."
        )
    return dataclasses.replace(config or TokenizeConfig(), max_len=max_len)


def save_run(run: ClassificationRun, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a run's report folder atomically.

    Contents: ``metrics.csv`` / ``metrics.json`` (the table plus label-handling notes),
    ``per_class_<method>.csv``, ``confusion_<method>.png``, ``predictions.h5ad`` (the test data
    with ``obs["<label>_<method>_pred"]`` / ``_prob``), ``config.yaml`` and, after fine-tuning,
    ``finetuned/`` (the classifier, safetensors only).
    """


    task = run.task
    predictions = task.test_data.copy()
    label = run.config.labels.key
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        table = run.table()
        table.to_csv(tmp / "metrics.csv", index=False)
        write_json(
            tmp / "metrics.json",
            {
                "setting": task.setting,
                "n_train": int(task.train_rows.size),
                "n_test": int(task.test_rows.size),
                "classes": task.classes,
                "notes": task.notes,
                "results": table.to_dict(orient="records"),
                "config": to_dict(run.config),
            },
        )
        for result in run.results:
            result.report.to_csv(tmp / f"per_class_{result.method}.csv")
            confusion_matrix(
                result.y_true, result.y_pred, title=f"{task.setting}: {result.method}",
                save=tmp / f"confusion_{result.method}.png",
            )
            write_predictions(predictions, result, key=f"{label}_{result.method}", overwrite=True)
        write_h5ad(predictions, tmp / "predictions.h5ad")
        save_config(run.config, tmp)
        if run.fitted is not None:
            run.fitted.save(tmp / "finetuned")
    return Path(out_dir)
