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
    model/              the final model bundle (:func:`mixgeneformer.model.save_bundle`)

Test hooks (documented so that fault-tolerance tests need no mocks):

``MIXGF_TEST_FAIL_AT_STEP="<rank>:<step>"``
    the process of that rank raises ``RuntimeError`` at the end of optimizer step ``<step>``.
``MIXGF_TEST_FAIL_IN_SAVE="<step>"``
    saving the checkpoint of that step raises ``OSError`` after the weights are written and
    before the ``COMPLETE`` marker, as a full disk would.
"""

from __future__ import annotations

import csv
import logging
import os
import platform
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import checkpoints as ckpt
from .config import from_dict, load_config, save_config
from .errors import ArtifactError, ConfigError, MixGeneformerError, VocabularyMismatchError
from .fileio import read_json, write_json
from .sampling import PretrainSampler, batch_seed

logger = logging.getLogger(__name__)

CORPUS_META = "mixgf_corpus.json"
BUNDLE_DIR = "model"
SIGNAL_SYNC_STEPS = 10
EVAL_MASK_EPOCH = -1  # the masking seed of held-out cells: never a training epoch  # distributed runs check for a stop signal every this many steps
METRICS_FIELDS = (
    "step",
    "epoch",
    "loss",
    "mlm_loss",
    "contrastive_loss",
    "cross_species_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "eval_loss",
    "eval_mlm_loss",
    "eval_top1",
    "eval_top10",
    "eval_unigram_loss",
    "eval_unigram_top1",
    "eval_unigram_top10",
    "eval_rank_unigram_loss",
    "eval_rank_unigram_top1",
    "eval_rank_unigram_top10",
    "time_s",
)
# Dense bf16 peak FLOP/s used for MFU. H100/H200: the project's convention (790 TFLOP/s, below
# the 989 of the SXM datasheet, so MFU is not flattered); others from vendor datasheets.
PEAK_BF16_FLOPS = {"H200": 790e12, "H100": 790e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


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
    max_steps: int = -1  # > 0 overrides epochs
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where supported, else fp32
    torch_compile: bool = False


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
        if self.train.max_steps <= 0 and self.train.epochs <= 0:
            raise ConfigError("set train.epochs > 0 or train.max_steps > 0.")
        if self.train.weight_decay < 0 or self.train.max_grad_norm < 0:
            raise ConfigError("train.weight_decay and train.max_grad_norm must be >= 0.")
        if self.distributed.strategy == "deepspeed" and self.distributed.deepspeed_config is None:
            raise ConfigError(
                "distributed.strategy=deepspeed needs distributed.deepspeed_config (e.g. configs/deepspeed_zero2.json)."
            )
        if self.logging.peak_tflops is not None and self.logging.peak_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops must be > 0, got {self.logging.peak_tflops}.")
        check_model_options(self.model.preset, {"model.overrides": self.model.overrides, "objective": self.objective})
        return self


def check_model_options(preset: str, sections: dict[str, dict[str, Any]]) -> None:
    """Reject an unknown preset and option names that are no MixGeneformerConfig field."""
    from . import model as model_module

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
def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a GPU that supports it, else ``"fp32"``; explicit values are checked."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32 on this machine.")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16 is not supported by this GPU; use fp16 or auto.")
    return precision


def device_peak_flops(device: torch.device | str | None = None, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the device (None where unknown, e.g. CPUs)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device if device is not None and str(device) != "cpu" else None)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def count_flop_parameters(model: torch.nn.Module) -> int:
    """Non-embedding parameters (the encoder's matmuls; word/position/token-type embeddings and
    the tied decoder are excluded -- the decoder is counted per masked token in :func:`training_flops`)."""
    total = 0
    for name, param in model.named_parameters():
        if "embeddings" in name or "cls.predictions.decoder" in name:
            continue
        total += param.numel()
    return total


def training_flops(
    n_params: int,
    n_layers: int,
    hidden: int,
    batch: int,
    seq_len: int,
    n_views: int = 1,
    vocab_size: int = 0,
    n_predicted: int = 0,
) -> float:
    """Model FLOPs of one training pass (forward + backward) over a padded batch.

    ``n_views * (6 N T + 12 L H S T) + 6 V H P``, with ``T = batch * seq_len`` tokens (padded:
    the hardware computes them), ``N`` the non-embedding parameters
    (:func:`count_flop_parameters`), ``L`` layers, ``H`` hidden size, ``S`` the sequence length,
    ``V`` the vocabulary and ``P`` the positions whose MLM logits are computed. ``6 N T`` is the
    dense matmuls (2 forward + 4 backward FLOPs per parameter and token); ``12 L H S T`` the
    attention scores and weighted sums (``2 * 2 * S * H`` per token and layer forward, x3 with
    backward); ``6 V H P`` the decoder over the vocabulary. SimCSE encodes each batch twice
    (``n_views=2``). MFU = FLOPs / step time / peak FLOP/s of the device (dense bf16).
    """
    tokens = float(batch) * float(seq_len)
    encoder = n_views * (6.0 * n_params * tokens + 12.0 * n_layers * hidden * seq_len * tokens)
    return encoder + 6.0 * vocab_size * hidden * float(n_predicted)


# --------------------------------------------------------------------------------------------
# Corpus and model
# --------------------------------------------------------------------------------------------
def corpus_vocab_hash(corpus_dir: Path) -> str | None:
    """The vocabulary hash a corpus records in ``mixgf_corpus.json`` (None if it records none)."""
    meta_path = Path(corpus_dir) / CORPUS_META
    if not meta_path.exists():
        raise ArtifactError(
            f"{corpus_dir} is not a mixgeneformer corpus ({CORPUS_META} missing). Create it with `mixgf tokenize`."
        )
    meta = read_json(meta_path, "corpus metadata")
    return meta.get("vocab_hash") if isinstance(meta, dict) else None


def check_corpora(paths: list[Path], vocab: Any) -> None:
    """Every corpus must exist and record the hash of ``vocab``; checked before training starts."""
    for path in paths:
        if not Path(path).is_dir():
            raise ArtifactError(f"corpus folder not found: {path} (data.corpus). Check the path.")
        recorded = corpus_vocab_hash(Path(path))
        if recorded != vocab.hash:
            raise VocabularyMismatchError(
                f"corpus {path} was tokenized with vocabulary {recorded}, but data.vocab has hash {vocab.hash}. "
                "Use the vocab.json the corpus was built with, or re-tokenize the data."
            )


def open_corpus(paths: list[Path], max_cells: int | None = None):
    """Memory-map the corpora (``load_from_disk``) and concatenate them; no row is read here."""
    import datasets

    parts = []
    for path in paths:
        try:
            part = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise ArtifactError(f"corpus {path} could not be opened ({exc}); it may be incomplete. Re-tokenize it.") from exc
        if isinstance(part, datasets.DatasetDict):
            raise ArtifactError(f"corpus {path} holds several splits; point data.corpus at one split folder.")
        if "input_ids" not in part.column_names:
            raise ArtifactError(f"corpus {path} has no 'input_ids' column (columns: {part.column_names}).")
        parts.append(part)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if max_cells is not None and max_cells < len(dataset):
        dataset = dataset.select(range(max_cells))
    if len(dataset) == 0:
        raise ArtifactError(f"the corpus {[str(p) for p in paths]} holds no cells.")
    return dataset


def corpus_lengths(dataset) -> np.ndarray:
    """Per-cell sequence lengths (the ``length`` column, or counted from ``input_ids``)."""
    if "length" in dataset.column_names:
        return np.asarray(dataset.with_format("numpy")["length"], dtype=np.int64)
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    return np.asarray(pc.list_value_length(table.column("input_ids")), dtype=np.int64)


def corpus_species_codes(dataset) -> tuple[np.ndarray, list[str]]:
    """Integer species codes per cell and the code -> species name list."""
    if "species" not in dataset.column_names:
        raise ArtifactError("the corpus has no 'species' column, needed for species-balanced sampling.")
    column = dataset.with_format("arrow")["species"]
    import pyarrow as pa

    if isinstance(column, pa.Table):
        column = column.column(0)
    encoded = column.combine_chunks().dictionary_encode() if isinstance(column, pa.ChunkedArray) else column.dictionary_encode()
    return np.asarray(encoded.indices, dtype=np.int64), [str(s) for s in encoded.dictionary.to_pylist()]


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


def build_model(config: PretrainConfig, vocab: Any):
    """The model of ``config``: preset + overrides + objective options, validated."""
    from . import model as model_module

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


def environment_record(precision: str, world_size: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, devices and the dtype in use: what a reader needs to reproduce a run."""
    import accelerate
    import datasets
    import transformers

    from . import __version__

    record: dict[str, Any] = {
        "mixgeneformer": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
        "cpu_threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision": precision,
        "autocast_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
        "sdpa_flash": bool(torch.cuda.is_available() and torch.backends.cuda.flash_sdp_enabled()),
    }
    try:
        import deepspeed  # noqa: F401

        record["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    record.update(extra or {})
    return record


# --------------------------------------------------------------------------------------------
# Collation: deterministic masking
# --------------------------------------------------------------------------------------------
def make_mlm_collator(vocab: Any, data: DataOptions, max_len: int | None = None) -> Any:
    """The MLM collator of :mod:`mixgeneformer.collator` (dynamic padding + 80/10/10 masking)."""
    from .collator import PretrainingCollator

    return PretrainingCollator(
        vocab, mlm_probability=data.mlm_probability, pad_to_multiple_of=data.pad_to_multiple_of, max_len=max_len
    )


def make_eval_collator(vocab: Any, data: DataOptions, max_len: int | None, seed: int) -> SeededMaskingCollator:
    """Masking of held-out cells: the same positions at every evaluation (fixed epoch), each one
    replaced by ``<mask>`` (no random or unchanged tokens whose identity the model could copy)."""
    from .collator import PretrainingCollator

    inner = PretrainingCollator(
        vocab, mlm_probability=data.mlm_probability, pad_to_multiple_of=data.pad_to_multiple_of, max_len=max_len,
        mask_fraction=1.0, random_fraction=0.0,
    )
    collator = SeededMaskingCollator(inner, seed=seed)
    collator.epoch = EVAL_MASK_EPOCH
    return collator


def _compute_eval_metrics(prediction: Any) -> dict[str, float]:
    from .diagnostics import compute_eval_metrics

    return compute_eval_metrics(prediction)


# --------------------------------------------------------------------------------------------
# Collation: the seeded wrapper
# --------------------------------------------------------------------------------------------
class SeededMaskingCollator:
    """Wrap the MLM collator so each batch's masking is seeded by (seed, epoch, batch content).

    A resumed run skips the batches it already trained on without collating them; with masking
    drawn from the global RNG the first resumed batches would be masked differently from a straight
    run. Seeding per batch makes resume exact and makes masking independent of DataLoader workers.
    """

    def __init__(self, inner: Any, seed: int) -> None:
        self.inner = inner
        self.seed = int(seed)
        self.epoch = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        seed = batch_seed(self.seed, self.epoch, ids)
        numpy_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % (2**32))
            try:
                rows = [{"input_ids": i} for i in ids]
                if features and "species" in features[0]:
                    for row, feature in zip(rows, features, strict=True):
                        row["species"] = feature["species"]
                batch = dict(self.inner(rows))
            finally:
                np.random.set_state(numpy_state)
        return batch


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
def _make_trainer_class():
    from transformers import Trainer

    class MixGeneformerTrainer(Trainer):
        """HF Trainer + loss parts in the logs, our sampler, throughput/MFU, atomic checkpoints."""

        def __init__(self, *args, run_extras: dict[str, Any], sampler_options: dict[str, Any], **kwargs):
            super().__init__(*args, **kwargs)
            self.run_extras = run_extras
            self.sampler_options = sampler_options
            # Accumulated on the device between log events: no host sync per step.
            self._parts: dict[str, torch.Tensor] = {}
            self._parts_count = 0
            self._flops = 0.0  # encoder FLOPs (from shapes only)
            self._predicted: torch.Tensor | int = 0  # MLM positions, for the decoder FLOPs
            self._tokens = 0
            self._window_start = time.perf_counter()
            self._staging = False
            unwrapped = self.model
            self._flop_params = count_flop_parameters(unwrapped)
            cfg = unwrapped.config
            self._n_layers, self._hidden, self._vocab_size = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
            self._n_views = 2 if float(getattr(cfg, "contrastive_weight", 0.0) or 0.0) > 0 else 1
            self._peak = None

        # --- data order -------------------------------------------------------------------
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            opts = self.sampler_options
            global_batch = self.args.per_device_train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            sampler = PretrainSampler(
                n_examples=len(dataset),
                batch_size=global_batch,
                seed=self.args.seed,
                lengths=opts.get("lengths"),
                species_codes=opts.get("species_codes"),
                group_by_length=opts["group_by_length"],
                species_balanced=opts["species_balanced"],
            )
            collator = self.data_collator
            original_set_epoch = sampler.set_epoch

            def set_epoch(epoch: int) -> None:
                original_set_epoch(epoch)
                if isinstance(collator, SeededMaskingCollator):
                    collator.epoch = int(epoch)

            sampler.set_epoch = set_epoch  # type: ignore[method-assign]
            return sampler

        # --- held-out diagnostics -----------------------------------------------------------
        def evaluate(self, *args, **kwargs):
            # Held-out cells are masked by the evaluation collator (fixed positions, all <mask>).
            eval_collator = self.run_extras.get("eval_collator")
            train_collator = self.data_collator
            if eval_collator is not None:
                self.data_collator = eval_collator
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.data_collator = train_collator

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            baselines = self.run_extras.get("baselines")
            if baselines is None:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            from .diagnostics import masked_gene_stats

            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                outputs = model(**inputs, output_masked_logits=True)
                stats = masked_gene_stats(outputs.masked_logits, inputs["labels"], baselines)
            # Per-cell sums travel as "logits" (gathered per cell across ranks); labels are a placeholder.
            return outputs.loss.detach().mean(), stats, torch.zeros_like(stats[:, :1])

        # --- loss parts and throughput ------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs.loss
            if model.training:
                for name in ("mlm_loss", "contrastive_loss", "cross_species_loss"):
                    value = getattr(outputs, name, None)
                    if value is not None:
                        value = value.detach().float()
                        self._parts[name] = self._parts[name] + value if name in self._parts else value
                self._parts_count += 1
                ids = inputs["input_ids"]
                self._tokens += int(ids.numel())
                labels = inputs.get("labels")
                if labels is not None:
                    self._predicted = self._predicted + (labels != -100).sum()
                self._flops += training_flops(
                    self._flop_params, self._n_layers, self._hidden, ids.shape[0], ids.shape[1], self._n_views
                )
            if self.args.n_gpu > 1:
                loss = loss.mean()
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self._parts_count:
                names = sorted(self._parts)
                if names:
                    values = torch.stack([self._parts[n] for n in names]).double() / self._parts_count
                    if torch.distributed.is_available() and torch.distributed.is_initialized():
                        # Average the loss parts over ranks, like the Trainer's own `loss`.
                        torch.distributed.all_reduce(values)
                        values = values / torch.distributed.get_world_size()
                    for name, value in zip(names, values.cpu().tolist(), strict=True):
                        logs[name] = value
                predicted = int(self._predicted)
                flops = self._flops + training_flops(0, 0, self._hidden, 0, 0, 1, self._vocab_size, predicted)
                elapsed = max(time.perf_counter() - self._window_start, 1e-9)
                world = self.args.world_size
                logs["tokens_per_s"] = self._tokens * world / elapsed
                if self._peak is None:
                    self._peak = device_peak_flops(self.args.device, self.run_extras.get("peak_tflops")) or 0.0
                if self._peak:
                    logs["mfu"] = flops / elapsed / self._peak
                self._parts, self._parts_count, self._flops, self._tokens, self._predicted = {}, 0, 0.0, 0, 0
                self._window_start = time.perf_counter()
            super().log(logs, start_time)

        # --- atomic checkpoints -------------------------------------------------------------
        def _get_output_dir(self, trial):
            if self._staging:
                return str(ckpt.staging_dir(self.args.output_dir))
            return super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            run_dir = Path(self.args.output_dir)
            step = self.state.global_step
            staged = ckpt.staging_dir(run_dir) / f"checkpoint-{step}"
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
                if self.args.should_save:
                    # A pickle of TrainingArguments; nothing reads it and we keep no pickles around.
                    (staged / "training_args.bin").unlink(missing_ok=True)
                    self._write_extras(staged)
                    _maybe_fail_in_save(step)
            except BaseException:
                if self.args.should_save:
                    shutil.rmtree(staged, ignore_errors=True)
                raise
            finally:
                self._staging = False
            # Every rank has written its RNG state into the staging folder before it is sealed.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                ckpt.write_complete_marker(staged, step)
                ckpt.publish_checkpoint(staged, run_dir)
                try:
                    ckpt.staging_dir(run_dir).rmdir()
                except OSError:
                    pass
                ckpt.rotate_checkpoints(run_dir, self.run_extras.get("keep"))
                logger.info("checkpoint %s complete", run_dir / staged.name)
            self.accelerator.wait_for_everyone()

        def _write_extras(self, folder: Path) -> None:
            extras = self.run_extras
            save_config(extras["config"], folder)
            extras["vocab"].save(folder / "vocab.json")
            if extras.get("medians_path") is not None:
                shutil.copyfile(extras["medians_path"], folder / "medians.tsv")
            write_json(folder / "environment.json", extras["environment"])

    return MixGeneformerTrainer


def _maybe_fail_in_save(step: int) -> None:
    target = os.environ.get("MIXGF_TEST_FAIL_IN_SAVE")
    if target and int(target) == step:
        raise OSError(28, f"No space left on device (MIXGF_TEST_FAIL_IN_SAVE={target})")


# --------------------------------------------------------------------------------------------
# Callbacks: metrics CSV, signals, test failure hook
# --------------------------------------------------------------------------------------------
def _make_callbacks(run_dir: Path, is_main: bool, tensorboard: bool):
    from transformers import TrainerCallback

    class MetricsCSV(TrainerCallback):
        """Append one row per log event to ``metrics.csv`` (rank 0 only)."""

        def __init__(self, path: Path) -> None:
            self.path = path
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if not any(k in logs for k in ("loss", "eval_loss")):
                return
            row = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.perf_counter() - self.start, 3)}
            row.update({k: logs[k] for k in METRICS_FIELDS if k in logs})
            new = not self.path.exists()
            with open(self.path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=METRICS_FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)

    class StopOnSignal(TrainerCallback):
        """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop (then exit non-zero)."""

        def __init__(self) -> None:
            self.received: int | None = None
            self.previous: dict[int, Any] = {}

        def install(self) -> None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass

        def uninstall(self) -> None:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = {}

        def _handle(self, signum, frame):
            if self.received is not None:  # a second signal: stop right away
                self.uninstall()
                raise KeyboardInterrupt
            self.received = signum
            logger.warning("received signal %s: saving a checkpoint after this step, then stopping", signum)

        def on_step_end(self, args, state, control, **kwargs):
            flag = 0 if self.received is None else int(self.received)
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            if distributed and state.global_step % SIGNAL_SYNC_STEPS:
                return control  # ranks agree on a stop only every SIGNAL_SYNC_STEPS steps (one tiny collective)
            if distributed:
                # One rank's signal stops every rank at the same step (else the others would hang).
                tensor = torch.tensor([flag], device=args.device)
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
                flag = int(tensor.item())
            if flag:
                self.received = flag
                control.should_save = True
                control.should_training_stop = True
            return control

    class FailAtStep(TrainerCallback):
        """Test hook ``MIXGF_TEST_FAIL_AT_STEP="<rank>:<step>"``: that rank raises at that step."""

        def on_step_end(self, args, state, control, **kwargs):
            target = os.environ.get("MIXGF_TEST_FAIL_AT_STEP")
            if not target:
                return
            rank, step = (int(x) for x in target.split(":"))
            if args.process_index == rank and state.global_step == step:
                raise RuntimeError(f"injected failure on rank {rank} at step {step} (MIXGF_TEST_FAIL_AT_STEP)")

    callbacks: list[Any] = [MetricsCSV(run_dir / "metrics.csv"), FailAtStep()]
    stopper = StopOnSignal()
    callbacks.append(stopper)
    if tensorboard and is_main:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return callbacks, stopper


def _evaluate_at_end_callback():
    """Also evaluate after the last step (the final held-out numbers), not only every eval_steps."""
    from transformers import TrainerCallback

    class EvaluateAtEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_evaluate = True
            return control

    return EvaluateAtEnd()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
class TrainingInterrupted(MixGeneformerError):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint; resume with ``--resume``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


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


def _plan_run_dir(run_dir: Path, resume: bool, overwrite: bool, resume_from: Path | None) -> tuple[str, Path | None]:
    """Decide fresh / overwrite / resume without writing anything (every rank computes the same)."""
    if resume_from is not None:
        return "resume", ckpt.resolve_checkpoint(resume_from)
    occupied = run_dir.exists() and any(p.name != ckpt.STAGING for p in run_dir.iterdir())
    if resume:
        checkpoint = ckpt.latest_complete_checkpoint(run_dir)
        return ("resume", checkpoint) if checkpoint is not None else ("fresh", None)
    if occupied:
        if overwrite:
            return "overwrite", None
        raise ArtifactError(
            f"run folder {run_dir} already exists. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another output_dir."
        )
    return "fresh", None


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
        After SIGTERM / SIGINT, once the checkpoint is saved.
    """
    from .vocab import Vocabulary

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
    mode, checkpoint = _plan_run_dir(run_dir, resume, overwrite, Path(resume_from) if resume_from else None)
    precision = resolve_precision(config.train.precision)
    torch.manual_seed(config.train.seed)
    model = build_model(config, vocab)

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
    baselines = None
    if eval_set is not None:
        # Counted once from the training split, cut like the model's inputs (diagnostics module).
        from .diagnostics import frequency_baselines

        baselines = frequency_baselines(
            train_set.select_columns(keep), len(vocab), np.asarray(vocab.special_ids),
            bucket_size=config.logging.rank_bucket, max_len=int(lengths.max()),
            max_cells=config.logging.baseline_cells, seed=config.train.seed,
        )
    if "species" in train_set.column_names:
        keep.append("species")  # the cross-species term pairs cells of different species
    train_set = train_set.select_columns(keep).with_format("numpy")
    if eval_set is not None:
        eval_set = eval_set.select_columns(keep).with_format("numpy")

    # 3. Trainer.
    args = _training_arguments(config, run_dir, precision, eval_set is not None)
    is_main = rank == 0
    if mode == "overwrite" and is_main:
        shutil.rmtree(run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
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
    callbacks, stopper = _make_callbacks(run_dir, is_main, config.logging.tensorboard)
    if eval_set is not None:
        callbacks.append(_evaluate_at_end_callback())
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        callbacks=callbacks,
        compute_metrics=_compute_eval_metrics if baselines is not None else None,
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
    stopper.install()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as exc:
        # torch.load(weights_only=True) refused a pickle that is not plain tensor data.
        if type(exc).__name__ != "UnpicklingError":
            raise
        raise ArtifactError(
            f"checkpoint {checkpoint} holds a file that is not plain tensor data ({exc}); it was refused "
            "unexecuted (torch.load weights_only=True). Delete that checkpoint or resume from another."
        ) from exc
    finally:
        stopper.uninstall()
    if stopper.received is not None:
        raise TrainingInterrupted(
            f"training stopped by signal {stopper.received} at step {trainer.state.global_step}; "
            f"checkpoint saved in {run_dir}. Continue with --resume.",
            stopper.received,
        )

    # 5. The final bundle (rank 0; full weights gathered first under FSDP).
    bundle_dir = run_dir / BUNDLE_DIR
    _save_final_bundle(trainer, bundle_dir, vocab, config.data.medians)
    trainer.accelerator.wait_for_everyone()
    return PretrainResult(
        run_dir=run_dir,
        bundle_dir=bundle_dir,
        global_step=trainer.state.global_step,
        resumed_from=checkpoint,
        final_loss=float(output.training_loss) if output.training_loss is not None else None,
        metrics_csv=run_dir / "metrics.csv",
    )


def _training_arguments(config: PretrainConfig, run_dir: Path, precision: str, has_eval: bool):
    from transformers import TrainingArguments

    train, dist, log = config.train, config.distributed, config.logging
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "output_dir": str(run_dir),
        "per_device_train_batch_size": train.per_device_batch_size,
        "per_device_eval_batch_size": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.schedule,
        "warmup_steps": train.warmup_steps,
        "weight_decay": train.weight_decay,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "max_grad_norm": train.max_grad_norm,
        "seed": train.seed,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "tf32": bool(cuda),
        "optim": "adamw_torch_fused" if cuda else "adamw_torch",
        "torch_compile": train.torch_compile,
        "logging_steps": log.logging_steps,
        "logging_first_step": True,
        "disable_tqdm": not log.progress_bar,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": config.checkpoint.save_steps,
        "save_total_limit": None,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": (log.eval_steps or config.checkpoint.save_steps) if has_eval else None,
        "dataloader_num_workers": config.data.workers,
        "dataloader_drop_last": True,
        "dataloader_pin_memory": bool(cuda),
        "remove_unused_columns": False,
        "prediction_loss_only": True,
        "ddp_timeout": dist.timeout_s,
        "ddp_find_unused_parameters": False,
        "use_cpu": not cuda,
    }
    if dist.strategy == "deepspeed":
        kwargs["deepspeed"] = str(dist.deepspeed_config)
    elif dist.strategy == "fsdp":
        kwargs["fsdp"] = dist.fsdp
        kwargs["fsdp_config"] = {"transformer_layer_cls_to_wrap": [dist.fsdp_wrap_layer]}
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"the training options are inconsistent: {exc}") from exc


def _save_final_bundle(trainer, bundle_dir: Path, vocab: Any, medians_path: Path | None) -> None:
    from . import model as model_module

    state_dict = None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # Collective: every rank takes part in gathering the full weights.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if state_dict is not None:
        fresh = model_module.MixGeneformerForPretraining(model.config)
        fresh.load_state_dict(state_dict, strict=False)
        model = fresh
    medians = None
    if medians_path is not None:
        from .medians import GeneMedians

        medians = GeneMedians.load(medians_path)
    model_module.save_bundle(model, bundle_dir, vocab, medians=medians, overwrite=True)
    config = trainer.run_extras["config"]
    save_config(config, bundle_dir, "pretrain_config.yaml")
    corpus_config = Path(config.data.corpus[0]) / "config.yaml"
    if corpus_config.is_file():  # new cells are tokenized like the training corpus by default
        shutil.copyfile(corpus_config, bundle_dir / model_module.TOKENIZE_CONFIG_NAME)
    write_json(bundle_dir / "environment.json", trainer.run_extras["environment"])


def trim_metrics(path: Path, max_step: int) -> None:
    """Keep only the rows of ``metrics.csv`` logged at or before ``max_step`` (atomically)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if float(row.get("step") or 0) <= max_step]
    from .fileio import atomic_file

    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=METRICS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a run's ``metrics.csv`` as dicts of floats (empty cells omitted)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


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
    "load_pretrain_config",
    "pretrain_config_from_dict",
    "read_metrics",
    "resolve_precision",
    "run_pretraining",
    "training_flops",
]
