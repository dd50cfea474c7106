"""The training engine of pretraining on the Hugging Face Trainer: the Trainer subclass, its callbacks,
seeded masking, the training arguments and the final bundle. FLOP counting (:mod:`mixgeneformer.flops`)
and the metrics CSV (:mod:`mixgeneformer.metrics_csv`) are their own modules, re-exported here.

``MixGeneformerTrainer`` overrides private Trainer methods (``_get_train_sampler``,
``_save_checkpoint``, ``_get_output_dir``, ``_save``): pyproject.toml bounds ``transformers`` from above for that
reason, and tests/test_pretrain.py exercises each override (sampler order, atomic checkpoints, resume;
``_save``'s gathered FSDP weights: tests/test_fsdp.py)."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import accelerate
import datasets
import numpy as np
import torch
import transformers
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from . import __version__
from . import checkpoints as ckpt
from .bundle import TOKENIZE_CONFIG_NAME, save_bundle
from .cell_bank import save_cell_bank
from .config import save_config
from .devices import autocast_dtype
from .diagnostics import masked_gene_stats
from .errors import ConfigError
from .fileio import output_error, write_json
from .flops import PEAK_BF16_FLOPS, count_flop_parameters, device_peak_flops, training_flops
from .fsdp import checkpoint_state_dict, model_from_gathered, shard_model
from .medians import GeneMedians
from .metrics_csv import METRICS_FIELDS, MetricsCSV, read_metrics, trim_metrics
from .sampling import PretrainSampler, batch_seed
from .stopping import SignalFlag, StopOnDivergence, StopOnSignal
from .training_args import OneDeviceArguments

if TYPE_CHECKING:
    from .pretrain_config import PretrainConfig
    from .vocab import Vocabulary

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS_FIELDS",
    "PEAK_BF16_FLOPS",
    "EvaluateAtEnd",
    "FailAtStep",
    "MetricsCSV",
    "MixGeneformerTrainer",
    "SeededMaskingCollator",
    "compile_encoder_blocks",
    "count_flop_parameters",
    "encoder_views",
    "device_peak_flops",
    "environment_record",
    "read_metrics",
    "resolve_precision",
    "save_final_bundle",
    "training_arguments",
    "training_flops",
    "trim_metrics",
]


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a GPU with native bf16 (Ampere and later), else ``"fp32"``; explicit values are checked."""
    cuda = torch.cuda.is_available()
    if precision == "auto":  # bf16 where the GPU computes it natively (as embedding's "auto"), not where emulated
        return "bf16" if autocast_dtype(torch.device("cuda" if cuda else "cpu"), "auto") is not None else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32 on this machine.")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16 is not supported by this GPU; use fp16 or auto.")
    return precision


def environment_record(precision: str, world_size: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, devices and the dtype in use: what a reader needs to reproduce a run."""
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


def encoder_views(config: transformers.BertConfig) -> int:
    """Encoder passes over the batch in one training forward (for the FLOPs): view 1, the second view of
    SimCSE / SimCSE++ when the contrastive term is on, and the ortholog projection of the "projection"
    cross-species term (the "mnn" pairing encodes nothing more)."""
    contrastive = getattr(config, "contrastive", "none") != "none" and float(getattr(config, "contrastive_weight", 0.0) or 0.0) > 0
    projection = (float(getattr(config, "cross_species_weight", 0.0) or 0.0) > 0
                  and getattr(config, "cross_species_positives", "mnn") == "projection")
    return 1 + int(contrastive) + int(projection)


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
        self._n_views = encoder_views(cfg)
        self._peak = None

    def create_optimizer(self, model=None):  # FSDP2: shard here (tied MLM head in one group), before the optimizer and Accelerate
        shard_model(self.accelerator, self.model)
        return super().create_optimizer(model)

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

    def planned_steps(self) -> int:
        """The optimizer step the run ends at: ``train.max_steps``, or as many steps as ``train.epochs``
        make (the Trainer's own count). A checkpoint at or past it leaves nothing to train: resumed there,
        the Trainer would still take a step past a fractional epoch."""
        if self.args.max_steps > 0:
            return int(self.args.max_steps)
        return int(self.set_initial_training_values(self.args, self.get_train_dataloader())[-1])  # max_steps: last in every release

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

    def get_eval_dataloader(self, eval_dataset=None):
        # Every held-out cell is scored: the training loader drops its last partial batch (dataloader_drop_last),
        # and the Trainer applied that to evaluation too (an eval set under one batch was never evaluated).
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop_last

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        baselines = self.run_extras.get("baselines")
        if baselines is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
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
        super().log(logs, start_time)  # callbacks: metrics.csv gets the row, then StopOnDivergence may stop

    # --- atomic checkpoints -------------------------------------------------------------
    def _get_output_dir(self, trial):
        if self._staging:
            return str(ckpt.staging_dir(self.args.output_dir))
        return super()._get_output_dir(trial)

    def _issue_warnings_after_load(self, load_result):  # the tied MLM decoder is never stored: not "missing"
        tied = getattr(self.accelerator.unwrap_model(self.model), "_tied_weights_keys", None) or {}
        super()._issue_warnings_after_load(load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied]))

    def _save(self, output_dir=None, state_dict=None):  # FSDP's gathered weights: full tensors, tied ones once (as DDP)
        super()._save(output_dir, checkpoint_state_dict(self.model, state_dict) if state_dict is not None else None)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self.args.output_dir)
        step = self.state.global_step
        staged = ckpt.staging_dir(run_dir) / f"checkpoint-{step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            # every rank its cross-species queue, like its RNG state: a resumed run pairs against the same cells
            save_cell_bank(self.accelerator.unwrap_model(self.model), staged, self.args.process_index)
            if self.args.should_save:
                # A pickle of TrainingArguments; nothing reads it and we keep no pickles around.
                (staged / "training_args.bin").unlink(missing_ok=True)
                self._write_extras(staged)
                _maybe_fail_in_save(step)
        except BaseException as exc:
            self._abandon_save(staged, exc)
        finally:
            self._staging = False
        # Every rank has written its RNG state into the staging folder before it is sealed.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            try:  # the marker is the save's last write: a disk the weights just filled fails here too
                ckpt.write_complete_marker(staged, step)
                ckpt.publish_checkpoint(staged, run_dir)
            except BaseException as exc:
                self._abandon_save(staged, exc)
            try:
                ckpt.staging_dir(run_dir).rmdir()
            except OSError:
                pass
            ckpt.rotate_checkpoints(run_dir, self.run_extras.get("keep"))
            logger.info("checkpoint %s complete", run_dir / staged.name)
        self.accelerator.wait_for_everyone()

    def _abandon_save(self, staged: Path, exc: BaseException) -> None:
        """Remove the staging folder of a failed save (rank 0) and raise: a full or read-only disk as one
        :class:`ArtifactError` naming the checkpoint; the previous checkpoints stay as they were."""
        run_dir = staged.parent.parent
        error = output_error(run_dir / staged.name, exc)  # before the cleanup frees the space it reads
        if self.args.should_save:
            shutil.rmtree(staged.parent, ignore_errors=True)
        if error is not None:
            raise error from exc
        raise exc

    def _write_extras(self, folder: Path) -> None:
        extras = self.run_extras
        save_config(extras["config"], folder)
        extras["vocab"].save(folder / "vocab.json")
        if extras.get("medians_path") is not None:
            shutil.copyfile(extras["medians_path"], folder / "medians.tsv")
        write_json(folder / "environment.json", extras["environment"])


def compile_encoder_blocks(model: torch.nn.Module, **options: Any) -> None:
    """``torch.compile`` every encoder block in place (``nn.Module.compile``: parameter names and
    checkpoints unchanged; the masked-position MLM head and the losses stay eager). Shapes vary
    with dynamic padding: after the first recompilation the length dimension is treated as dynamic.
    ``options`` go to ``torch.compile`` (e.g. ``backend``)."""
    for layer in model.bert.encoder.layer:
        layer.compile(**options)


def _maybe_fail_in_save(step: int) -> None:
    target = os.environ.get("MIXGF_TEST_FAIL_IN_SAVE")
    if target and int(target) == step:
        raise OSError(28, f"No space left on device (MIXGF_TEST_FAIL_IN_SAVE={target})")


class FailAtStep(TrainerCallback):
    """Test hook ``MIXGF_TEST_FAIL_AT_STEP="<rank>:<step>"``: that rank raises at that step."""

    def on_step_end(self, args, state, control, **kwargs):
        target = os.environ.get("MIXGF_TEST_FAIL_AT_STEP")
        if not target:
            return
        rank, step = (int(x) for x in target.split(":"))
        if args.process_index == rank and state.global_step == step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step} (MIXGF_TEST_FAIL_AT_STEP)")


class EvaluateAtEnd(TrainerCallback):
    """Also evaluate after the last step (the final held-out numbers), not only every eval_steps."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


def _make_callbacks(run_dir: Path, is_main: bool, tensorboard: bool, signals: SignalFlag):
    # StopOnDivergence after MetricsCSV: the last row of metrics.csv shows the non-finite loss
    callbacks: list[Any] = [MetricsCSV(run_dir / "metrics.csv"), StopOnDivergence("train"), FailAtStep()]
    stopper = StopOnSignal(signals)
    callbacks.append(stopper)
    if tensorboard and is_main:
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return callbacks, stopper


def start_cpu_process_group(timeout_s: int) -> None:
    """Start the gloo process group of a multi-process CPU run (torchrun's environment) with
    ``distributed.timeout_s``: transformers passes its ``ddp_timeout`` only to GPU groups, so a hung
    rank would block the others for the 30-minute default. Accelerate then uses this group."""
    import datetime

    import torch.distributed as torch_dist

    if torch_dist.is_available() and not torch_dist.is_initialized():
        torch_dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))


def training_arguments(config: PretrainConfig, run_dir: Path, precision: str, has_eval: bool) -> OneDeviceArguments:
    """Hugging Face ``TrainingArguments`` of a :class:`~mixgeneformer.pretrain.PretrainConfig`: one device per process."""
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
        "tf32": bool(cuda) and transformers.utils.is_torch_tf32_available(),  # TrainingArguments refuses it below Ampere
        "optim": "adamw_torch_fused" if cuda else "adamw_torch",
        "torch_compile": train.torch_compile,
        "logging_steps": log.logging_steps,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,  # a diverged loss is logged as it is, and stops the run (StopOnDivergence)
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
        kwargs["fsdp_config"] = {"transformer_layer_cls_to_wrap": [dist.fsdp_wrap_layer], "version": 2}  # fsdp.shard_model
    try:
        return OneDeviceArguments(**kwargs)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"the training options are inconsistent: {exc}") from exc


def save_final_bundle(trainer: MixGeneformerTrainer, bundle_dir: Path, vocab: Vocabulary, medians_path: Path | None) -> None:
    """Write the run's model bundle from rank 0 (full weights gathered first under FSDP / DeepSpeed)."""
    state_dict = None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # Collective: every rank takes part in gathering the full weights.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if state_dict is not None:
        model = model_from_gathered(model.config, state_dict)
    medians = None
    if medians_path is not None:
        medians = GeneMedians.load(medians_path)
    save_bundle(model, bundle_dir, vocab, medians=medians, overwrite=True)
    config = trainer.run_extras["config"]
    save_config(config, bundle_dir, "pretrain_config.yaml")
    corpus_config = Path(config.data.corpus[0]) / "config.yaml"
    if corpus_config.is_file():  # new cells are tokenized like the training corpus by default
        shutil.copyfile(corpus_config, bundle_dir / TOKENIZE_CONFIG_NAME)
    write_json(bundle_dir / "environment.json", trainer.run_extras["environment"])
