"""The configuration of a pretraining run: :class:`PretrainConfig` and its sections, checked
before any data is read, and the readers of its YAML / dict forms.

A run saves its config as ``config.yaml`` in the run folder and beside every checkpoint; a resumed
run is compared with it (:func:`mixgeneformer.resume.check_resume_config`). The run itself is
:func:`mixgeneformer.pretrain.run_pretraining`, which re-exports these names.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import from_dict, load_config
from .errors import ConfigError, MixGeneformerError
from .model_config import PRESETS, MixGeneformerConfig, make_config

if TYPE_CHECKING:
    from .vocab import Vocabulary


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
    """Architecture: a preset of :data:`mixgeneformer.model_config.PRESETS` plus config overrides."""

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
    # "unigram": a fresh model's MLM output bias starts at the log gene frequencies of the training cells, so the
    # first steps go to what the context adds rather than to relearning frequencies; "zero": BERT's init.
    mlm_bias_init: Literal["zero", "unigram"] = "zero"


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


#: the vocabulary size :meth:`PretrainConfig.validate` checks the model options with (data.vocab is not read there)
_STAND_IN_VOCAB_SIZE = 8


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; saved as ``config.yaml`` beside every checkpoint.

    ``objective`` holds model-config fields of the pretraining objective (e.g. ``temperature``,
    ``contrastive_weight``, ``gather_negatives``, ``pooling``); each key must be a field of
    :class:`~mixgeneformer.model_config.MixGeneformerConfig`.
    """

    output_dir: Path | None = None
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    objective: dict[str, Any] = field(default_factory=dict)
    train: TrainOptions = field(default_factory=TrainOptions)
    distributed: DistributedOptions = field(default_factory=DistributedOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    logging: LoggingOptions = field(default_factory=LoggingOptions)

    def model_config(self, vocab: Vocabulary | None) -> MixGeneformerConfig:
        """The model's configuration: the preset, ``model.overrides`` and ``objective``, validated; an invalid
        option is named where this config sets it (``objective.<field>``, ``model.overrides.<field>``).
        ``vocab`` None: the options alone are checked (with a stand-in vocabulary size), before any file is read."""
        check_model_options(self.model.preset, {"model.overrides": self.model.overrides, "objective": self.objective})
        overrides = {**self.model.overrides, **self.objective}
        stand_in = {"vocab_size": _STAND_IN_VOCAB_SIZE} if vocab is None else {}
        try:
            return make_config(self.model.preset, vocab, **overrides, **stand_in)
        except ConfigError as exc:
            raise ConfigError(self.option_names(str(exc))) from exc
        except MixGeneformerError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid model options {overrides}: {exc}") from exc

    def option_names(self, message: str) -> str:
        """``message`` of a model-config check with each ``model.<field>`` named where this config sets it
        (``objective.<field>`` or ``model.overrides.<field>``)."""

        def named(match: re.Match[str]) -> str:
            key = match.group(1)
            return f"objective.{key}" if key in self.objective else (
                f"model.overrides.{key}" if key in self.model.overrides else match.group(0))

        return re.sub(r"\bmodel\.(\w+)", named, message)

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
        for name, value in (("train.weight_decay", self.train.weight_decay), ("train.max_grad_norm", self.train.max_grad_norm)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}.")
        if self.distributed.strategy == "deepspeed" and self.distributed.deepspeed_config is None:
            raise ConfigError(
                "distributed.strategy=deepspeed needs distributed.deepspeed_config (e.g. configs/deepspeed_zero2.json)."
            )
        if self.train.torch_compile and self.train.compile_blocks:
            raise ConfigError("train.torch_compile (whole model) and train.compile_blocks (each encoder block): choose one.")
        if self.logging.peak_tflops is not None and self.logging.peak_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops must be > 0, got {self.logging.peak_tflops}.")
        self.model_config(None)  # option names and values (a wrong type failed only once the corpus was opened)
        return self


def check_strategy_device(distributed: DistributedOptions, cuda: bool, transformers_version: str | None = None) -> None:
    """Refuse, before any work, a ``distributed.strategy`` that would not shard as asked: fsdp /
    deepspeed on a machine without a CUDA GPU (``cuda``). Accelerate enables them only for GPU-type
    jobs; a torchrun job of CPU processes (gloo) drops the plugin without a word and trains as DDP
    (``AcceleratorState``: the FSDP branch covers MULTI_GPU / NPU / XPU..., never MULTI_CPU; DeepSpeed
    needs ``not cpu``). FSDP itself (Accelerate's FSDP2, with the tied MLM head in one group:
    :mod:`mixgeneformer.fsdp`) runs with torch 2.13: tests/test_fsdp.py trains, saves and resumes it
    on two CPU ranks with Accelerate's FSDP state forced on. transformers 4.x (``transformers_version``;
    default: the installed one) runs FSDP1 there, which that grouping does not cover: refused.
    """
    if distributed.strategy == "fsdp":
        if transformers_version is None:
            import transformers

            transformers_version = transformers.__version__
        if int(transformers_version.split(".")[0]) < 5:
            raise ConfigError(
                f"distributed.strategy=fsdp needs transformers >= 5 (FSDP2; this environment has {transformers_version}, "
                "whose Trainer runs FSDP1, untested with the tied MLM head). Upgrade transformers, or use "
                "distributed.strategy=deepspeed (distributed.deepspeed_config=configs/deepspeed_zero2.json)."
            )
    if distributed.strategy in ("fsdp", "deepspeed") and not cuda:
        raise ConfigError(
            f"distributed.strategy={distributed.strategy} needs CUDA GPUs, and this machine has none (on the CPU the "
            "training libraries would silently train as DDP instead). Use distributed.strategy=ddp here (torchrun "
            "over CPU processes, gloo), or run this config on GPUs."
        )


def check_training_cells(config: PretrainConfig, n_cells: int, n_train: int, world_size: int) -> None:
    """Refuse a split that leaves fewer training cells than one batch per process: every batch would be the
    dropped last partial one, so the run would train no step and save an untrained model as if it had."""
    batch = config.train.per_device_batch_size * max(1, world_size)
    if n_train >= batch:
        return
    held = f", after data.eval_fraction={config.data.eval_fraction} held out {n_cells - n_train}" if n_train < n_cells else ""
    raise ConfigError(
        f"the corpus has {n_train} training cells{held}, fewer than one batch of {batch} (train.per_device_batch_size="
        f"{config.train.per_device_batch_size} x {max(1, world_size)} processes): no training step could run. Lower "
        "data.eval_fraction or train.per_device_batch_size, or tokenize more cells."
    )


def check_model_options(preset: str, sections: dict[str, dict[str, Any]]) -> None:
    """Reject an unknown preset and option names that are no MixGeneformerConfig field."""

    if preset not in PRESETS:
        raise ConfigError(f"model.preset {preset!r} is unknown; choose one of {sorted(PRESETS)}.")
    known = MixGeneformerConfig()
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
