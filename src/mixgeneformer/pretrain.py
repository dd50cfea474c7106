"""Pretraining: a typed run configuration and training on the Hugging Face Trainer.

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

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from . import checkpoints as ckpt
from . import model as model_module
from .collator import PretrainingCollator
from .config import changed_settings, from_dict, load_config, save_config, to_dict
from .corpus import check_corpora, corpus_lengths, corpus_species_codes, open_corpus
from .diagnostics import FrequencyBaselines, compute_eval_metrics, frequency_baselines
from .errors import ArtifactError, ConfigError, MixGeneformerError, VocabularyMismatchError
from .fileio import write_json, write_output_marker
from .stopping import SignalFlag, StopRequested, TrainingInterrupted
from .trainer import (
    EvaluateAtEnd,
    MixGeneformerTrainer,
    SeededMaskingCollator,
    _make_callbacks,
    compile_encoder_blocks,
    environment_record,
    read_metrics,
    resolve_precision,
    save_final_bundle,
    training_arguments,
    training_flops,
    trim_metrics,
)
from .vocab import Vocabulary

logger = logging.getLogger(__name__)

BUNDLE_DIR = "model"
EVAL_MASK_EPOCH = -1  # the masking seed of held-out cells: never a training epoch


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class DataOptions:
    """Where the cells come from and how they are batched."""

    corpus: list[Path] = field(default_factory=list)  # one or more tokenized corpus folders
    vocab: Path | None = None  # vocab.json the corpora were tokenized with
    medians: Path | None = None  # medians.tsv, copied into checkpoints and the bundle
    eval_fraction: float = 0.0  # held-out cells for eval loss (0: no evaluation)
    max_cells: int | None = None  # use only the first N cells (quick runs)
    group_by_length: bool = True  # mega-batches sorted by length (Geneformer)
    species_balanced: bool = False  # each species an equal share of an epoch (with replacement)
    mlm_probability: float = 0.15
    pad_to_multiple_of: int = 8
    workers: int = 0  # DataLoader worker processes per rank


@dataclass
class ModelOptions:
    """Architecture: a preset of :data:`mixgeneformer.model.PRESETS` plus config overrides."""

    preset: str = "mix-geneformer"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainOptions:
    """Optimisation (defaults: the authors' schedule)."""

    learning_rate: float = 1e-3
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_steps: int = 10_000
    weight_decay: float = 0.001
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: float = 10.0
    max_steps: int = -1  # -1: train for `epochs`; > 0: this many optimizer steps (overrides epochs)
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where supported, else fp32
    torch_compile: bool = False
    compile_blocks: bool = False  # torch.compile each encoder block in place (the benchmark loop's setting)


@dataclass
class DistributedOptions:
    """Multi-GPU strategy (launch with torchrun / accelerate launch)."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    deepspeed_config: Path | None = None  # ZeRO json, e.g. configs/deepspeed_zero2.json
    fsdp: str = "full_shard auto_wrap"
    fsdp_wrap_layer: str = "BertLayer"
    timeout_s: int = 1800  # collective timeout: a dead rank ends the job instead of hanging it


@dataclass
class CheckpointOptions:
    save_steps: int = 1000
    keep: int = 3  # newest complete checkpoints kept (0: all)


@dataclass
class LoggingOptions:
    logging_steps: int = 50
    eval_steps: int | None = None  # default: save_steps
    rank_bucket: int = 8  # positions per bucket of the "unigram given rank" baseline
    baseline_cells: int = 200_000  # training cells the frequency baselines are counted from (at most)
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float | None = None  # device peak for MFU; None: looked up from the device name


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; saved as ``config.yaml`` beside every checkpoint.

    ``objective`` holds model-config fields of the pretraining objective (e.g. ``temperature``,
    ``contrastive_weight``, ``gather_negatives``, ``pooling``); each key must be a field of
    :class:`~mixgeneformer.model.MixGeneformerConfig`.
    """

    output_dir: Path | None = None
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    objective: dict[str, Any] = field(default_factory=dict)
    train: TrainOptions = field(default_factory=TrainOptions)
    distributed: DistributedOptions = field(default_factory=DistributedOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    logging: LoggingOptions = field(default_factory=LoggingOptions)

    def validate(self) -> PretrainConfig:
        """Check values and their combinations (no file is opened); return self."""
        if self.output_dir is None:
            raise ConfigError("output_dir is required: the run folder for checkpoints and the final model.")
        if not self.data.corpus:
            raise ConfigError("data.corpus is required: a list of corpus folders written by `mixgf tokenize`.")
        if self.data.vocab is None:
            raise ConfigError("data.vocab is required: the vocab.json the corpus was tokenized with.")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}.")
        if not 0.0 < self.data.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability must be in (0, 1), got {self.data.mlm_probability}.")
        if self.data.max_cells is not None and self.data.max_cells < 1:
            raise ConfigError(f"data.max_cells must be positive, got {self.data.max_cells}.")
        positive = {
            "data.pad_to_multiple_of": self.data.pad_to_multiple_of,
            "train.per_device_batch_size": self.train.per_device_batch_size,
            "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "checkpoint.save_steps": self.checkpoint.save_steps,
            "logging.logging_steps": self.logging.logging_steps,
            "logging.rank_bucket": self.logging.rank_bucket,
            "logging.baseline_cells": self.logging.baseline_cells,
            "distributed.timeout_s": self.distributed.timeout_s,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}.")
        nonneg = {
            "data.workers": self.data.workers,
            "train.warmup_steps": self.train.warmup_steps,
            "checkpoint.keep": self.checkpoint.keep,
        }
        for name, value in nonneg.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}.")
        if self.train.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.train.learning_rate}.")
        if self.train.max_steps == 0 or self.train.max_steps < -1:
            raise ConfigError(
                f"train.max_steps={self.train.max_steps} would train no step; use a positive number of optimizer "
                "steps, or -1 to train for train.epochs."
            )
        if self.train.max_steps <= 0 and self.train.epochs <= 0:
            raise ConfigError("set train.epochs > 0 or train.max_steps > 0.")
        if self.train.weight_decay < 0 or self.train.max_grad_norm < 0:
            raise ConfigError("train.weight_decay and train.max_grad_norm must be >= 0.")
        if self.distributed.strategy == "deepspeed" and self.distributed.deepspeed_config is None:
            raise ConfigError(
                "distributed.strategy=deepspeed needs distributed.deepspeed_config (e.g. configs/deepspeed_zero2.json)."
            )
        if self.train.torch_compile and self.train.compile_blocks:
            raise ConfigError("train.torch_compile (whole model) and train.compile_blocks (each encoder block): choose one.")
        if self.logging.peak_tflops is not None and self.logging.peak_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops must be > 0, got {self.logging.peak_tflops}.")
        check_model_options(self.model.preset, {"model.overrides": self.model.overrides, "objective": self.objective})
        return self


def check_model_options(preset: str, sections: dict[str, dict[str, Any]]) -> None:
    """Reject an unknown preset and option names that are no MixGeneformerConfig field."""

    if preset not in model_module.PRESETS:
        raise ConfigError(f"model.preset {preset!r} is unknown; choose one of {sorted(model_module.PRESETS)}.")
    known = model_module.MixGeneformerConfig()
    for section, options in sections.items():
        for key in options:
            if key in ("vocab_size", "vocab_hash", "special_token_ids") or not hasattr(known, key):
                raise ConfigError(
                    f"{section}.{key} is not a settable field of MixGeneformerConfig; check the spelling "
                    "(vocabulary fields come from data.vocab)."
                )


def load_pretrain_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate (before any data is read)."""
    return load_config(PretrainConfig, path, overrides).validate()


def pretrain_config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """Build and validate a :class:`PretrainConfig` from a plain nested dict."""
    return from_dict(PretrainConfig, data).validate()


# --------------------------------------------------------------------------------------------
# Devices, precision, FLOPs
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Corpus and model
# --------------------------------------------------------------------------------------------


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

    check_model_options(config.model.preset, {"model.overrides": config.model.overrides, "objective": config.objective})
    overrides = {**config.model.overrides, **config.objective}
    try:
        model_config = model_module.make_config(config.model.preset, vocab, **overrides)
    except MixGeneformerError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid model options {overrides}: {exc}") from exc
    model = model_module.MixGeneformerForPretraining(model_config)
    model.attach_vocabulary(vocab)  # special ids and the ortholog map (cross-species term)
    return model


# --------------------------------------------------------------------------------------------
# Collation: deterministic masking
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Collation: the seeded wrapper
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Callbacks: metrics CSV, signals, test failure hook
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
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


#: Settings a resumed run may change (prefixes end in "."): how long to train, where and how often
#: to write. Every other setting shapes the model, the optimizer, the learning-rate schedule or the
#: data order that the checkpoint was made with.
RESUME_MAY_CHANGE = (
    "output_dir", "train.max_steps", "train.epochs", "checkpoint.", "logging.", "data.workers", "distributed.timeout_s",
)


def check_resume_config(config: PretrainConfig, checkpoint: Path, vocab: Vocabulary) -> list[str]:
    """Compare a resumed run's settings with those its checkpoint was saved with.

    Returns the changes that are allowed on resume (:data:`RESUME_MAY_CHANGE`, e.g. a larger
    ``train.max_steps``), one line each; every other difference is a :class:`ConfigError`, since
    the checkpoint's weights, optimizer and schedule were made with the old values and the run
    folder's ``config.yaml`` must record the settings really in effect.
    """
    saved_vocab = checkpoint / "vocab.json"
    if saved_vocab.is_file() and Vocabulary.load(saved_vocab).hash != vocab.hash:
        raise VocabularyMismatchError(
            f"data.vocab ({config.data.vocab}) is not the vocabulary {checkpoint.name} was trained with "
            f"({saved_vocab}); resume with that vocabulary, or start a new run."
        )
    saved_config = checkpoint / "config.yaml"
    if not saved_config.is_file():
        logger.warning("%s records no config.yaml; the resumed settings cannot be compared with it", checkpoint)
        return []
    try:
        previous = to_dict(from_dict(PretrainConfig, yaml.safe_load(saved_config.read_text()) or {}, str(saved_config)))
    except (ConfigError, yaml.YAMLError) as exc:
        raise ArtifactError(f"{saved_config} cannot be read as a pretraining config ({exc}); resume from another checkpoint.") from exc
    changed = changed_settings(previous, to_dict(config))
    lines = [f"{key}: {old!r} -> {new!r}" for key, old, new in changed]
    allowed = [key.startswith(RESUME_MAY_CHANGE) for key, _, _ in changed]
    refused = [line for line, ok in zip(lines, allowed, strict=True) if not ok]
    if refused:
        raise ConfigError(
            f"cannot resume from {checkpoint} with changed settings ({'; '.join(refused)}): the checkpoint's weights, "
            f"optimizer and learning-rate schedule were made with the values in {saved_config}. Restore them, or start "
            "a new run (another output_dir, or --overwrite). On resume only these may change: "
            f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUME_MAY_CHANGE)}."
        )
    return [line for line, ok in zip(lines, allowed, strict=True) if ok]


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
        Replace an existing run folder.
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
        return _run_pretraining(config, resume, overwrite, resume_from, signals)
    finally:
        signals.uninstall()


# long: the run in order (folder, corpus, model, Trainer, train, interrupt, bundle); each step uses the previous ones' locals.
def _run_pretraining(
    config: PretrainConfig, resume: bool, overwrite: bool, resume_from: str | os.PathLike | None, signals: SignalFlag
) -> PretrainResult:
    config.validate()
    run_dir = Path(config.output_dir).resolve()  # type: ignore[arg-type]
    rank, world_size = _distributed_env()

    # 1. Everything that can fail cheaply fails before the corpus is touched.
    vocab = Vocabulary.load(config.data.vocab)
    if config.data.medians is not None and not Path(config.data.medians).is_file():
        raise ArtifactError(f"data.medians file not found: {config.data.medians}.")
    check_corpora(list(config.data.corpus), vocab)
    if config.distributed.deepspeed_config is not None and not Path(config.distributed.deepspeed_config).is_file():
        raise ArtifactError(f"distributed.deepspeed_config not found: {config.distributed.deepspeed_config}.")
    inputs = [*config.data.corpus, config.data.vocab, config.data.medians, config.distributed.deepspeed_config]
    mode, checkpoint = ckpt.plan_run_dir(run_dir, resume, overwrite, Path(resume_from) if resume_from else None, inputs)
    if checkpoint is not None:
        for change in check_resume_config(config, checkpoint, vocab):
            logger.warning("resuming from %s with a changed setting, now in effect: %s", checkpoint.name, change)
    precision = resolve_precision(config.train.precision)
    torch.manual_seed(config.train.seed)
    model = build_model(config, vocab)
    if config.train.compile_blocks:
        compile_encoder_blocks(model)

    # 2. The corpus, memory-mapped.
    dataset = open_corpus(list(config.data.corpus), config.data.max_cells)
    train_set, eval_set = split_train_eval(dataset, config.data.eval_fraction, config.train.seed)
    model_max_len = int(model.config.max_position_embeddings)
    lengths = corpus_lengths(train_set)
    truncate_to = None
    if int(lengths.max()) > model_max_len:
        logger.warning(
            "the corpus holds cells of up to %d tokens; they are cut to the model's %d positions (top-ranked genes kept)",
            int(lengths.max()), model_max_len,
        )
        lengths = np.minimum(lengths, model_max_len)
        truncate_to = model_max_len
    species_codes = None
    if config.data.species_balanced:
        species_codes, _names = corpus_species_codes(train_set)
    keep = ["input_ids"]
    baselines = None if eval_set is None else _frequency_baselines(config, train_set.select_columns(keep), vocab, lengths)
    if "species" in train_set.column_names:
        keep.append("species")  # the cross-species term pairs cells of different species
    train_set = train_set.select_columns(keep).with_format("numpy")
    if eval_set is not None:
        eval_set = eval_set.select_columns(keep).with_format("numpy")

    # 3. Trainer.
    args = training_arguments(config, run_dir, precision, eval_set is not None)
    is_main = rank == 0
    if mode == "overwrite" and is_main:
        shutil.rmtree(run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_output_marker(run_dir)
        ckpt.clean_stale(run_dir)
        # metrics.csv continues from the checkpoint: rows logged after it (before a crash) are dropped.
        trim_metrics(run_dir / "metrics.csv", ckpt.checkpoint_step(checkpoint) if checkpoint else 0)
    environment = environment_record(precision, args.world_size, {"mode": mode, "resumed_from": str(checkpoint) if checkpoint else None})
    logger.info("precision in use: %s (requested %s) on %s", precision, config.train.precision, environment["devices"])
    if is_main:
        save_config(config, run_dir)
        write_json(run_dir / "environment.json", environment)
        if baselines is not None:
            write_json(run_dir / "frequency_baselines.json", baselines.summary())
    collator = SeededMaskingCollator(make_mlm_collator(vocab, config.data, truncate_to), seed=config.train.seed)
    callbacks, stopper = _make_callbacks(run_dir, is_main, config.logging.tensorboard, signals)
    if eval_set is not None:
        callbacks.append(EvaluateAtEnd())
    trainer = MixGeneformerTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        callbacks=callbacks,
        compute_metrics=compute_eval_metrics if baselines is not None else None,
        run_extras={
            "config": config,
            "vocab": vocab,
            "medians_path": config.data.medians,
            "environment": environment,
            "keep": config.checkpoint.keep,
            "peak_tflops": config.logging.peak_tflops,
            "baselines": baselines,
            "eval_collator": make_eval_collator(vocab, config.data, truncate_to, config.train.seed),
        },
        sampler_options={
            "lengths": lengths,
            "species_codes": species_codes,
            "group_by_length": config.data.group_by_length,
            "species_balanced": config.data.species_balanced,
        },
    )
    trainer.accelerator.wait_for_everyone()

    # 4. Train.
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
        raise TrainingInterrupted(
            f"training stopped by signal {stopper.received} at step {trainer.state.global_step}; "
            f"checkpoint saved in {run_dir}. Continue with --resume.",
            stopper.received,
        )

    # 5. The final bundle (rank 0; full weights gathered first under FSDP).
    bundle_dir = run_dir / BUNDLE_DIR
    save_final_bundle(trainer, bundle_dir, vocab, config.data.medians)
    trainer.accelerator.wait_for_everyone()
    return PretrainResult(
        run_dir=run_dir,
        bundle_dir=bundle_dir,
        global_step=trainer.state.global_step,
        resumed_from=checkpoint,
        final_loss=float(output.training_loss) if output.training_loss is not None else None,
        metrics_csv=run_dir / "metrics.csv",
    )




__all__ = [
    "CheckpointOptions",
    "DataOptions",
    "DistributedOptions",
    "LoggingOptions",
    "ModelOptions",
    "PretrainConfig",
    "PretrainResult",
    "TrainOptions",
    "TrainingInterrupted",
    "build_model",
    "check_resume_config",
    "compile_encoder_blocks",
    "load_pretrain_config",
    "pretrain_config_from_dict",
    "read_metrics",
    "resolve_precision",
    "run_pretraining",
    "training_flops",
]


def make_mlm_collator(vocab: Vocabulary, data: DataOptions, max_len: int | None = None) -> PretrainingCollator:
    """The MLM collator of :mod:`mixgeneformer.collator` (dynamic padding + 80/10/10 masking)."""

    return PretrainingCollator(
        vocab, mlm_probability=data.mlm_probability, pad_to_multiple_of=data.pad_to_multiple_of, max_len=max_len
    )


def make_eval_collator(vocab: Vocabulary, data: DataOptions, max_len: int | None, seed: int) -> SeededMaskingCollator:
    """Masking of held-out cells: the same positions at every evaluation (fixed epoch), each one
    replaced by ``<mask>`` (no random or unchanged tokens whose identity the model could copy)."""
    inner = PretrainingCollator(
        vocab, mlm_probability=data.mlm_probability, pad_to_multiple_of=data.pad_to_multiple_of, max_len=max_len,
        mask_fraction=1.0, random_fraction=0.0,
    )
    collator = SeededMaskingCollator(inner, seed=seed)
    collator.epoch = EVAL_MASK_EPOCH
    return collator


def _frequency_baselines(config: PretrainConfig, train_set: Any, vocab: Vocabulary, lengths: np.ndarray) -> FrequencyBaselines:
    """The held-out diagnostics' baselines, counted once from the training split, cut like the model's inputs."""
    return frequency_baselines(
        train_set, len(vocab), np.asarray(vocab.special_ids),
        bucket_size=config.logging.rank_bucket, max_len=int(lengths.max()),
        max_cells=config.logging.baseline_cells, seed=config.train.seed,
    )
