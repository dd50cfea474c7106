"""Pretraining on the Hugging Face Trainer: :func:`run_pretraining`, as a sequence of named steps.

The run's typed configuration (:class:`PretrainConfig` and its sections) is in
:mod:`mixgeneformer.pretrain_config` and re-exported here.

One process on a CPU; ``torchrun`` or ``accelerate launch`` for many GPUs or nodes (DDP, FSDP or
DeepSpeed ZeRO-2). The corpus stays memory-mapped (``datasets.load_from_disk``); each rank reads
only the rows of its own batches.

Run folder (``output_dir``)::

    config.yaml         the resolved PretrainConfig
    environment.json    versions, devices, world size, the dtype actually in use
    metrics.csv         one row per logging step (losses, lr, tokens/s, MFU) and per evaluation
                        (held-out MLM loss, top-1 / top-10 masked-gene accuracy, and the same for
                        the frequency baselines of :mod:`mixgeneformer.diagnostics`)
    frequency_baselines.json   what the baselines were counted from (with data.eval_fraction > 0)
    tensorboard/        the same metrics for TensorBoard
    checkpoint-<step>/  atomic checkpoints (see :mod:`mixgeneformer.checkpoints`), each with the
                        config, vocabulary, medians and environment record beside the weights
    model/              the final model bundle (:func:`mixgeneformer.bundle.save_bundle`)

Test hooks (documented so that fault-tolerance tests need no mocks):

``MIXGF_TEST_FAIL_AT_STEP="<rank>:<step>"``
    the process of that rank raises ``RuntimeError`` at the end of optimizer step ``<step>``.
``MIXGF_TEST_FAIL_IN_SAVE="<step>"``
    saving the checkpoint of that step raises ``OSError`` after the weights are written and
    before the ``COMPLETE`` marker, as a full disk would.
"""


from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import checkpoints as ckpt
from . import model as model_module
from .cell_bank import load_cell_bank
from .collator import EVAL_MASK_EPOCH, HeldOutMaskingCollator, PretrainingCollator  # noqa: F401 (EVAL_MASK_EPOCH: re-exported)
from .config import save_config
from .corpus import (
    check_corpora,
    check_two_species,
    corpus_lengths,
    corpus_species_codes,
    open_corpus,
)
from .diagnostics import FrequencyBaselines, compute_eval_metrics, frequency_baselines
from .errors import ArtifactError, ConfigError
from .fileio import content_hash, output_lock, write_json, write_output_marker
from .flops import training_flops
from .metrics_csv import read_metrics, trim_metrics
from .model_config import check_pooling_input
from .pretrain_config import (  # re-exported: the run's typed configuration
    CheckpointOptions,
    DataOptions,
    DistributedOptions,
    LoggingOptions,
    ModelOptions,
    PretrainConfig,
    TrainOptions,
    check_strategy_device,
    check_training_cells,
    load_pretrain_config,
    pretrain_config_from_dict,
)
from .resume import RESUME_KEEPS, RESUME_MAY_CHANGE, check_resume_config, check_resume_corpus  # noqa: F401 (RESUME_*: re-exported)
from .stopping import SignalFlag, StopOnSignal, StopRequested, TrainingInterrupted
from .trainer import (
    EvaluateAtEnd,
    MixGeneformerTrainer,
    SeededMaskingCollator,
    _make_callbacks,
    compile_encoder_blocks,
    environment_record,
    resolve_precision,
    save_final_bundle,
    start_cpu_process_group,
    training_arguments,
)
from .training_args import multi_tensor_adamw
from .vocab import Vocabulary

if TYPE_CHECKING:
    import datasets
    from transformers import TrainingArguments
    from transformers.trainer_utils import TrainOutput

logger = logging.getLogger(__name__)

BUNDLE_DIR = "model"


def split_train_eval(dataset, eval_fraction: float, seed: int):
    """A deterministic train / eval split by index (no cache files are written into the corpus)."""
    if eval_fraction <= 0:
        return dataset, None
    n = len(dataset)
    n_eval = max(1, int(round(n * eval_fraction)))
    if n_eval >= n:
        raise ConfigError(f"data.eval_fraction={eval_fraction} leaves no training cells out of {n}.")
    order = np.random.default_rng(seed).permutation(n)
    return dataset.select(np.sort(order[n_eval:])), dataset.select(np.sort(order[:n_eval]))


def build_model(config: PretrainConfig, vocab: Vocabulary) -> model_module.MixGeneformerForPretraining:
    """The model of ``config``: preset + overrides + objective options, validated."""
    model = model_module.MixGeneformerForPretraining(config.model_config(vocab))
    model.attach_vocabulary(vocab)  # special ids and the ortholog map (cross-species term)
    return model


@dataclass
class PretrainResult:
    """What a finished run produced."""

    run_dir: Path
    bundle_dir: Path
    global_step: int
    resumed_from: Path | None
    final_loss: float | None
    metrics_csv: Path


def _distributed_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_pretraining(
    config: PretrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    resume_from: str | os.PathLike | None = None,
) -> PretrainResult:
    """Pretrain a Mix-Geneformer model as configured; return where the model bundle is.

    Parameters
    ----------
    config
        A validated :class:`PretrainConfig`.
    resume
        Continue from the newest complete checkpoint of ``config.output_dir`` (start fresh when
        there is none).
    overwrite
        Replace an existing run folder (kept beside it as ``.NAME.replaced`` until the new run finishes).
    resume_from
        Continue from this checkpoint folder instead (it must be complete).

    Raises
    ------
    ConfigError, ArtifactError, VocabularyMismatchError
        Before any training step, for bad options, missing or damaged files, or a corpus built with
        another vocabulary.
    TrainingInterrupted
        After SIGTERM / SIGINT, once the checkpoint is saved (a signal during setup stops at once).
    """
    signals = SignalFlag()
    signals.install()  # before any data is read: a signal at any moment is handled
    try:
        config.validate()
        check_strategy_device(config.distributed, torch.cuda.is_available())  # FSDP / DeepSpeed: GPUs only
        # a second run writing the same folder meanwhile is refused (rank 0 writes the folder)
        with output_lock(config.output_dir) if _distributed_env()[0] == 0 else contextlib.nullcontext():
            return _run_pretraining(config, resume, overwrite, resume_from, signals)
    finally:
        signals.uninstall()


# The run, one step per function; each step's results go to the next through these records.
@dataclass
class _RunPlan:
    """What the checks before any data is read decided."""

    run_dir: Path
    is_main: bool  # rank 0: writes the run folder
    vocab: Vocabulary
    mode: str  # plan_run_dir: "fresh" | "overwrite" | "resume"
    checkpoint: Path | None  # the checkpoint to resume from
    precision: str  # in use (resolve_precision)


@dataclass
class _TrainingData:
    """The memory-mapped training (and held-out) cells, and what the sampler and baselines need of them."""

    train_set: datasets.Dataset
    eval_set: datasets.Dataset | None
    lengths: np.ndarray  # tokens per training cell, capped at the model's positions
    truncate_to: int  # the model's positions: no batch (training or held-out) is cut or padded past them
    species_codes: np.ndarray | None  # per training cell, for species-balanced sampling
    baselines: FrequencyBaselines | None  # the held-out diagnostics' baselines (with eval cells)


def _run_pretraining(
    config: PretrainConfig, resume: bool, overwrite: bool, resume_from: str | os.PathLike | None, signals: SignalFlag
) -> PretrainResult:
    plan = _plan_run(config, resume, overwrite, resume_from)
    model = _seeded_model(config, plan.vocab)
    data = _open_data(config, plan.vocab, int(model.config.max_position_embeddings))
    check_two_species(data.train_set, float(model.config.cross_species_weight), config.data.max_cells, data.species_codes)
    check_pooling_input(model.config, [ids[0] for ids in data.train_set[:1000]["input_ids"]], plan.vocab.cls_id)
    if config.train.mlm_bias_init == "unigram" and plan.checkpoint is None:
        counted = data.baselines or _frequency_baselines(config, data.train_set.select_columns(["input_ids"]), plan.vocab, data.lengths)
        model.init_mlm_bias(torch.from_numpy(counted.unigram_log_prob))
    lengths = data.lengths.astype("<i8")  # the training cells, as a checkpoint records them (check_resume_corpus)
    corpus = {"cells": int(lengths.size), "tokens": int(lengths.sum()), "hash": content_hash(lengths.tobytes())}
    if plan.checkpoint is not None:
        check_resume_corpus(plan.checkpoint, corpus, _distributed_env()[1])
    if _distributed_env()[1] > 1 and not torch.cuda.is_available():
        start_cpu_process_group(config.distributed.timeout_s)  # before the Trainer's own, which would ignore it
    args = training_arguments(config, plan.run_dir, plan.precision, data.eval_set is not None)
    if args.world_size > 1:  # asking sets up the process group; then, before rank 0 writes: one view of output_dir
        ckpt.check_ranks_agree(plan.run_dir, plan.mode, plan.checkpoint)
    environment = _prepare_run_dir(config, plan, args.world_size, data.baselines, corpus)
    trainer, stopper = _make_trainer(config, plan, model, data, args, environment, signals)
    output = _train(trainer, stopper, signals, plan)
    return _finish(trainer, plan, config, output)


def _plan_run(config: PretrainConfig, resume: bool, overwrite: bool, resume_from: str | os.PathLike | None) -> _RunPlan:
    """Everything that can fail cheaply fails before the corpus is touched: inputs, the run folder's
    plan (fresh / overwrite / resume), the resumed settings, the precision."""
    config.validate()
    run_dir = Path(config.output_dir).resolve()  # type: ignore[arg-type]
    rank, _world_size = _distributed_env()
    vocab = Vocabulary.load(config.data.vocab)
    if config.data.medians is not None and not Path(config.data.medians).is_file():
        raise ArtifactError(f"data.medians file not found: {config.data.medians}.")
    check_corpora(list(config.data.corpus), vocab, config.data.medians)
    if config.distributed.deepspeed_config is not None and not Path(config.distributed.deepspeed_config).is_file():
        raise ArtifactError(f"distributed.deepspeed_config not found: {config.distributed.deepspeed_config}.")
    inputs = [*config.data.corpus, config.data.vocab, config.data.medians, config.distributed.deepspeed_config]
    mode, checkpoint = ckpt.plan_run_dir(run_dir, resume, overwrite, Path(resume_from) if resume_from else None, inputs)
    if checkpoint is not None:
        for change in check_resume_config(config, checkpoint, vocab):
            logger.warning("resuming from %s with a changed setting, now in effect: %s", checkpoint.name, change)
    precision = resolve_precision(config.train.precision)
    return _RunPlan(run_dir, rank == 0, vocab, mode, checkpoint, precision)


def _seeded_model(config: PretrainConfig, vocab: Vocabulary) -> model_module.MixGeneformerForPretraining:
    """The model, initialised under ``train.seed`` (encoder blocks compiled with ``train.compile_blocks``)."""
    torch.manual_seed(config.train.seed)
    model = build_model(config, vocab)
    if config.train.compile_blocks:
        compile_encoder_blocks(model)
    return model


def _open_data(config: PretrainConfig, vocab: Vocabulary, model_max_len: int) -> _TrainingData:
    """The corpus, memory-mapped, split into training and held-out cells, cut to the model's positions."""
    dataset = open_corpus(list(config.data.corpus), config.data.max_cells)
    train_set, eval_set = split_train_eval(dataset, config.data.eval_fraction, config.train.seed)
    check_training_cells(config, len(dataset), len(train_set), _distributed_env()[1])
    lengths = corpus_lengths(train_set)
    # The collators' max_len is always the model's positions: a held-out cell may be longer than every
    # training cell, and padding to a multiple of 8 must not run past them either.
    if int(lengths.max()) > model_max_len:
        logger.warning(
            "the corpus holds cells of up to %d tokens; they are cut to the model's %d positions (top-ranked genes kept)",
            int(lengths.max()), model_max_len,
        )
        lengths = np.minimum(lengths, model_max_len)
    species_codes = None
    if config.data.species_balanced:
        species_codes, names = corpus_species_codes(train_set)
        if len(names) < 2:  # a setting asked for that does nothing: say so
            logger.warning("data.species_balanced: the training cells are all %s, so there is no other species to balance "
                           "against; add a corpus of the other species, or set data.species_balanced: false",
                           names[0] if names else "of no species")
    keep = ["input_ids"]
    baselines = None if eval_set is None else _frequency_baselines(config, train_set.select_columns(keep), vocab, lengths)
    if "species" in train_set.column_names:
        keep.append("species")  # the cross-species term pairs cells of different species
    train_set = train_set.select_columns(keep).with_format("numpy")
    if eval_set is not None:
        eval_set = eval_set.select_columns(keep).with_format("numpy")
    return _TrainingData(train_set, eval_set, lengths, model_max_len, species_codes, baselines)


def _prepare_run_dir(
    config: PretrainConfig, plan: _RunPlan, world_size: int, baselines: FrequencyBaselines | None, corpus: dict[str, Any]
) -> dict[str, Any]:
    """The run folder on rank 0 (replaced with --overwrite, stale staging removed, metrics.csv cut
    back to the resumed checkpoint) with its config, environment and baselines records; returns
    the environment record."""
    run_dir, checkpoint = plan.run_dir, plan.checkpoint
    if plan.mode == "overwrite" and plan.is_main:
        ckpt.set_aside_previous_run(run_dir)
    if plan.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_output_marker(run_dir)
        ckpt.clean_stale(run_dir)
        # metrics.csv continues from the checkpoint: rows logged after it (before a crash) are dropped.
        trim_metrics(run_dir / "metrics.csv", ckpt.checkpoint_step(checkpoint) if checkpoint else 0)
    run = {"mode": plan.mode, "resumed_from": str(checkpoint) if checkpoint else None, "corpus": corpus}
    environment = environment_record(plan.precision, world_size, run)
    logger.info("precision in use: %s (requested %s) on %s", plan.precision, config.train.precision, environment["devices"])
    if plan.is_main:
        save_config(config, run_dir)
        write_json(run_dir / "environment.json", environment)
        if baselines is not None:
            write_json(run_dir / "frequency_baselines.json", baselines.summary())
    return environment


def _make_trainer(
    config: PretrainConfig, plan: _RunPlan, model: model_module.MixGeneformerForPretraining, data: _TrainingData,
    args: TrainingArguments, environment: dict[str, Any], signals: SignalFlag,
) -> tuple[MixGeneformerTrainer, StopOnSignal]:
    """The Trainer with its collators, callbacks (metrics, signals, evaluation at the end), sampler
    options and the records every checkpoint carries; returns it and its signal callback."""
    vocab = plan.vocab
    collator = SeededMaskingCollator(make_mlm_collator(vocab, config.data, data.truncate_to), seed=config.train.seed)
    callbacks, stopper = _make_callbacks(plan.run_dir, plan.is_main, config.logging.tensorboard, signals)
    if data.eval_set is not None:
        callbacks.append(EvaluateAtEnd())
    trainer = MixGeneformerTrainer(
        model=model,
        args=args,
        train_dataset=data.train_set,
        eval_dataset=data.eval_set,
        data_collator=collator,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=multi_tensor_adamw(args, model),
        compute_metrics=compute_eval_metrics if data.baselines is not None else None,
        run_extras={
            "config": config,
            "vocab": vocab,
            "medians_path": config.data.medians,
            "environment": environment,
            "keep": config.checkpoint.keep,
            "peak_tflops": config.logging.peak_tflops,
            "baselines": data.baselines,
            "eval_collator": make_eval_collator(vocab, config.data, data.truncate_to, config.train.seed),
        },
        sampler_options={
            "lengths": data.lengths,
            "species_codes": data.species_codes,
            "group_by_length": config.data.group_by_length,
            "species_balanced": config.data.species_balanced,
        },
    )
    trainer.accelerator.wait_for_everyone()
    return trainer, stopper


def _train(trainer: MixGeneformerTrainer, stopper: StopOnSignal, signals: SignalFlag, plan: _RunPlan) -> TrainOutput | None:
    """Train (from the checkpoint when resuming); TrainingInterrupted once a signal's checkpoint is saved."""
    checkpoint = plan.checkpoint
    if checkpoint is not None and (step := ckpt.checkpoint_step(checkpoint)) >= (last := trainer.planned_steps()):
        logger.warning("%s is at step %d and the run ends at step %d: nothing to train; the model is saved from it "
                       "(raise train.max_steps or train.epochs to train on)", checkpoint.name, step, last)
        trainer._load_from_checkpoint(str(checkpoint))  # transformers' own loader (weights only; FSDP / DeepSpeed too)
        trainer.state.global_step = step
        return None
    if checkpoint is not None:  # this rank's cross-species queue, as the checkpoint left it
        load_cell_bank(trainer.model, checkpoint, trainer.args.process_index)
    stopper.trainer = trainer
    signals.training = True
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except StopRequested:
        output = None
    except Exception as exc:
        # torch.load(weights_only=True) refused a pickle that is not plain tensor data.
        if type(exc).__name__ != "UnpicklingError":
            raise
        raise ArtifactError(
            f"checkpoint {checkpoint} holds a file that is not plain tensor data ({exc}); it was refused "
            "unexecuted (torch.load weights_only=True). Delete that checkpoint or resume from another."
        ) from exc
    finally:
        signals.training = False
    if stopper.received is not None:
        step = trainer.state.global_step
        saved = (f"checkpoint saved in {plan.run_dir}. Continue with --resume." if step > 0 else
                 "no step had run, so no checkpoint was saved; run the same command again to start.")
        raise TrainingInterrupted(f"training stopped by signal {stopper.received} at step {step}; {saved}", stopper.received)
    return output


def _finish(trainer: MixGeneformerTrainer, plan: _RunPlan, config: PretrainConfig, output: TrainOutput | None) -> PretrainResult:
    """The final bundle (rank 0; full weights gathered first under FSDP) and what the run produced."""
    bundle_dir = plan.run_dir / BUNDLE_DIR
    save_final_bundle(trainer, bundle_dir, plan.vocab, config.data.medians)
    if plan.is_main:
        ckpt.drop_previous_run(plan.run_dir)
    trainer.accelerator.wait_for_everyone()
    return PretrainResult(
        run_dir=plan.run_dir,
        bundle_dir=bundle_dir,
        global_step=trainer.state.global_step,
        resumed_from=plan.checkpoint,
        final_loss=float(output.training_loss) if output is not None and output.training_loss is not None else None,
        metrics_csv=plan.run_dir / "metrics.csv",
    )


def make_mlm_collator(vocab: Vocabulary, data: DataOptions, max_len: int | None = None) -> PretrainingCollator:
    """The MLM collator of :mod:`mixgeneformer.collator` (dynamic padding + 80/10/10 masking)."""
    return PretrainingCollator(vocab, mlm_probability=data.mlm_probability, pad_to_multiple_of=data.pad_to_multiple_of, max_len=max_len)


def make_eval_collator(vocab: Vocabulary, data: DataOptions, max_len: int | None, seed: int) -> HeldOutMaskingCollator:
    """Masking of held-out cells: the same positions at every evaluation and whatever batch (or process) a
    cell is in, each one replaced by ``<mask>`` (:class:`~mixgeneformer.collator.HeldOutMaskingCollator`)."""
    inner = PretrainingCollator(
        vocab, mlm_probability=data.mlm_probability, pad_to_multiple_of=data.pad_to_multiple_of, max_len=max_len,
        mask_fraction=1.0, random_fraction=0.0,
    )
    return HeldOutMaskingCollator(inner, seed=seed)



def _frequency_baselines(config: PretrainConfig, train_set: Any, vocab: Vocabulary, lengths: np.ndarray) -> FrequencyBaselines:
    """The held-out diagnostics' baselines, counted once from the training split, cut like the model's inputs."""
    return frequency_baselines(
        train_set, len(vocab), np.asarray(vocab.special_ids),
        bucket_size=config.logging.rank_bucket, max_len=int(lengths.max()),
        max_cells=config.logging.baseline_cells, seed=config.train.seed,
    )


__all__ = [
    "CheckpointOptions", "DataOptions", "DistributedOptions", "LoggingOptions", "ModelOptions", "PretrainConfig",
    "PretrainResult", "TrainOptions", "TrainingInterrupted", "build_model", "check_resume_config",
    "compile_encoder_blocks", "load_pretrain_config", "pretrain_config_from_dict", "read_metrics",
    "resolve_precision", "run_pretraining", "training_flops",
]
