"""Fine-tuning a classification head (model.MixGeneformerForCellClassification) on the Hugging Face Trainer."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from transformers import EarlyStoppingCallback

from ..bundle import (
    CLASSIFIER_KIND,
    TOKENIZE_CONFIG_NAME,
    WEIGHTS_NAME,
    bundle_tokenize_config,
    check_bundle_vocabulary,
    read_marker,
    refuse_hub_id,
    save_bundle,
)
from ..config import load_config, save_config
from ..devices import cuda_bf16, resolve_device
from ..errors import ArtifactError, ConfigError, check_config
from ..fileio import check_readable_file, read_json, scratch_folder, write_json
from ..inference import encoder_of
from ..medians import GeneMedians
from ..model import MixGeneformerForCellClassification
from ..model_config import CONFIG_VALUE_ERRORS
from ..stopping import StopOnDivergence
from ..training_args import OneDeviceArguments
from ..vocab import Vocabulary
from .config import ClassifyConfig, FinetuneConfig
from .metrics import EvalResult, Prediction, _argmax_labels, evaluate
from .recipe import (
    GREATER_IS_BETTER,
    FinetuneTrainer,
    PadCollator,
    beats,
    class_weights,
    default_learning_rate,
    init_head_from_probe,
    pooled_features,
    resolve_pooling,
    validation_metrics,
    validation_split,
    validation_summary,
)
from .tasks import (
    Task,
    TokenizedCells,
    _max_len_of,
    restrict_to_tokenized,
    tokenize_cells,
    tokenize_task,
)

if TYPE_CHECKING:
    import os

    import datasets
    from transformers import TrainerCallback

    from ..tokenize import TokenizeConfig

logger = logging.getLogger(__name__)


def build_classifier(
    model: torch.nn.Module,
    classes: Sequence[str],
    vocab: Vocabulary,
    config: FinetuneConfig | None = None,
    seed: int | None = None,
) -> MixGeneformerForCellClassification:
    """A classification model initialised from ``model``'s encoder, with layers frozen per ``config``.

    ``config.train_encoder=False`` trains only the head; ``config.freeze_layers=k`` freezes the
    embeddings and the bottom ``k`` encoder layers; ``config.freeze_embeddings`` the embeddings.
    ``config.pooling="auto"`` is resolved here from the model alone (mean unless it was pretrained
    with ``cls`` / ``pooler`` pooling); :func:`fit_classifier` also checks the cells' first token.
    ``seed`` initialises the head from that seed without touching the global random state
    (default: the global state, as any torch module).
    """
    check_config(config, FinetuneConfig)
    config = config or FinetuneConfig()
    bert = encoder_of(model)
    check_finetune_options(config, model)
    model_config = copy.deepcopy(bert.config)
    model_config.num_labels = len(classes)
    model_config.id2label = dict(enumerate(classes))
    model_config.label2id = {c: i for i, c in enumerate(classes)}
    model_config.cell_pooling = resolve_pooling(config.pooling, model)
    model_config.cls_token_id = vocab.cls_id  # cls pooling checks position 0 holds <cls>, not a species token
    model_config.classifier_dropout = config.classifier_dropout
    if config.attention_dropout is not None:
        model_config.attention_probs_dropout_prob = config.attention_dropout
    if config.hidden_dropout is not None:
        model_config.hidden_dropout_prob = config.hidden_dropout
    model_config.special_token_ids = [int(i) for i in vocab.special_ids]
    model_config.vocab_hash = vocab.hash
    if seed is None:
        classifier = MixGeneformerForCellClassification(model_config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = MixGeneformerForCellClassification(model_config)
    missing, unexpected = classifier.bert.load_state_dict(bert.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ConfigError(f"encoder weights do not fit the classifier: missing {missing}, unexpected {unexpected}.")
    trainable = config.train_encoder
    for parameter in classifier.bert.parameters():
        parameter.requires_grad = trainable
    if trainable and (config.freeze_layers or config.freeze_embeddings):
        for module in (classifier.bert.embeddings, *classifier.bert.encoder.layer[: config.freeze_layers]):
            for parameter in module.parameters():
                parameter.requires_grad = False
    return classifier


def refuse_finetune_max_len(config: FinetuneConfig) -> None:
    """``finetune.max_len`` is refused whichever methods run, never ignored: the tokenize configuration's
    ``max_len`` sets the cells' length for every method."""
    if config.max_len is not None:
        raise ConfigError(
            f"finetune.max_len={config.max_len} is not used by fine-tuning (the cells are tokenized once for every "
            f"method): pass run_classification(max_len={config.max_len}) / `mixgf classify --max-len "
            f"{config.max_len}` (or TokenizeConfig(max_len=...)) and leave finetune.max_len unset."
        )


def check_finetune_options(config: FinetuneConfig, model: torch.nn.Module | None = None) -> None:
    """The fine-tuning options that depend on the model or the machine, refused (ConfigError naming
    the option) before any cell is tokenized: ``freeze_layers`` beyond the model's layers, a
    ``device`` that is no torch device or is not on this machine, and ``max_len`` (not an option of
    fine-tuning: the tokenize configuration's ``max_len`` sets the cells' length)."""
    refuse_finetune_max_len(config)
    try:
        device = resolve_device(config.device)
    except ConfigError as exc:
        raise ConfigError(f"finetune.{exc}") from None
    if config.bf16 and device.type == "cuda" and not cuda_bf16(device):
        raise ConfigError(f"finetune.bf16=true, but {torch.cuda.get_device_name(device)} cannot compute in bf16; "
                          "set finetune.bf16=false")
    if model is not None:
        n_layers = len(encoder_of(model).encoder.layer)
        if config.freeze_layers > n_layers:
            raise ConfigError(f"finetune.freeze_layers={config.freeze_layers} but the model has {n_layers} layers.")


@dataclass
class FittedClassifier:
    """A fine-tuned classifier, its classes and its training log."""

    model: MixGeneformerForCellClassification
    classes: list[str]
    vocab: Vocabulary
    medians: GeneMedians | None
    config: ClassifyConfig
    log_history: list[dict[str, Any]]
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenize_config: TokenizeConfig | None = None  # how its cells were tokenized; saved so `mixgf predict` tokenizes alike

    def predict(self, dataset: datasets.Dataset, batch_size: int = 64, device: str | None = None) -> Prediction:
        """Class probabilities of every cell of a tokenized corpus (length-sorted batches).

        ``device`` None: the device it was fine-tuned on (``config.finetune.device``), or, where this
        machine has no such device (a classifier fine-tuned on a GPU, predicting on a laptop), CUDA
        when available, else the CPU."""
        model = self.model.to(self._device(device)).eval()
        features = pooled_features(model, dataset, self.vocab.pad_id, batch_size)
        with torch.inference_mode():
            logits = model.classifier(torch.from_numpy(features).to(model.classifier.weight))
        probabilities = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return Prediction(_argmax_labels(probabilities, self.classes), probabilities, list(self.classes))

    def _device(self, device: str | None) -> torch.device:
        if device is not None:
            return resolve_device(device)
        try:
            return resolve_device(self.config.finetune.device)
        except ConfigError:
            fallback = resolve_device(None)
            logger.warning("the classifier was fine-tuned on device %r, which this machine lacks: predicting on %s "
                           "(pass device= / --device to choose)", self.config.finetune.device, str(fallback))
            return fallback

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the classifier as a model bundle (:func:`mixgeneformer.bundle.save_bundle`, kind
        ``classifier``: config.json + model.safetensors, ``vocab.json``, ``medians.tsv``) plus its
        ``config.yaml``, ``tokenize.yaml`` (when known), ``training_log.json``,
        ``finetune_summary.json`` and ``training_curves.png`` (training and validation loss, learning
        rate and validation macro-F1 / accuracy against the step, when a loss was logged), atomically."""

        def write_run_files(tmp: Path) -> None:
            save_config(self.config, tmp)
            if self.tokenize_config is not None:
                save_config(self.tokenize_config, tmp, TOKENIZE_CONFIG_NAME)
            write_json(tmp / "training_log.json", self.log_history)
            write_json(tmp / "finetune_summary.json", self.summary)
            curves = pd.DataFrame([e for e in self.log_history if "step" in e and "train_loss" not in e])
            if {"step", "loss"} <= set(curves.columns) and curves["loss"].notna().any():
                from .. import plots

                plots.training_curves(curves, title="fine-tuning", save=tmp / "training_curves.png")

        return save_bundle(self.model, directory, self.vocab, self.medians, overwrite=overwrite, extra_files=write_run_files)


def _load_classifier_weights(weights_dir: Path) -> MixGeneformerForCellClassification:
    """The classification model of a folder; weights that are truncated or do not fit its config.json
    (other sizes, labels or layers: tensors left over or missing) are an error naming the folder."""
    fix = "re-save the classifier (`mixgf classify ... --out DIR` writes DIR/finetuned) or restore its files"
    try:
        model, info = MixGeneformerForCellClassification.from_pretrained(
            weights_dir, use_safetensors=True, output_loading_info=True
        )
    except (SafetensorError, OSError, RuntimeError, KeyError, *CONFIG_VALUE_ERRORS) as exc:
        raise ArtifactError(
            f"classifier {weights_dir / WEIGHTS_NAME} with {weights_dir / 'config.json'} could not be loaded "
            f"({type(exc).__name__}: {str(exc)[:300]}); the file is truncated or config.json does not describe these "
            f"weights: {fix}."
        ) from exc
    unfit = {name: sorted(map(str, info.get(name) or [])) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    unfit = {name: keys for name, keys in unfit.items() if keys}
    if unfit:
        raise ArtifactError(
            f"classifier weights {weights_dir / WEIGHTS_NAME} do not fit {weights_dir / 'config.json'} "
            f"({'; '.join(f'{n}: {len(k)}, e.g. {k[:2]}' for n, k in unfit.items())}): {fix}."
        )
    return model


def _classifier_folder(directory: str | os.PathLike) -> Path:
    """``directory`` as a Path, refused with what to pass instead when it is a Hub ID, a file, or the
    output folder of ``mixgf classify`` (whose classifier is in its ``finetuned/``)."""
    refuse_hub_id(directory)
    directory = Path(directory)
    if directory.is_file():
        raise ArtifactError(f"classifier {directory} is a file; --classifier (load_classifier) takes the folder of a "
                            "fine-tuned classifier: OUT/finetuned of `mixgf classify --out OUT`.")
    inner = directory / "finetuned"
    if not (directory / WEIGHTS_NAME).exists() and (inner / WEIGHTS_NAME).exists():
        raise ArtifactError(f"{directory} is the output folder of `mixgf classify`; pass {inner}, the classifier in it.")
    return directory


def load_classifier(directory: str | os.PathLike) -> FittedClassifier:
    """Load a classifier saved by :meth:`FittedClassifier.save` (safetensors only).

    Folders written before classifiers were bundles (the weights in a ``model/`` subfolder) load too.
    """
    directory = _classifier_folder(directory)
    weights_dir = directory / "model" if (directory / "model" / "config.json").is_file() else directory
    check_readable_file(weights_dir / WEIGHTS_NAME, "classifier weights")
    marker = read_marker(directory)
    if marker is not None and marker.get("kind") != CLASSIFIER_KIND:
        raise ArtifactError(
            f"{directory} is a pretrained model, not a fine-tuned classifier: fine-tune one with `mixgf classify "
            f"--model {directory} --out DIR` and pass DIR/finetuned."
        )
    vocab = Vocabulary.load(check_readable_file(directory / "vocab.json", "classifier vocabulary"))
    model = _load_classifier_weights(weights_dir)
    check_bundle_vocabulary(directory, marker, model.config, vocab)
    medians = GeneMedians.load(directory / "medians.tsv") if (directory / "medians.tsv").exists() else None
    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return FittedClassifier(
        model=model.eval(),
        classes=classes,
        vocab=vocab,
        medians=medians,
        config=load_config(ClassifyConfig, directory / "config.yaml"),
        log_history=read_json(directory / "training_log.json", "training log"),
        summary=read_json(directory / "finetune_summary.json", "fine-tuning summary")
        if (directory / "finetune_summary.json").exists()
        else {},
        tokenize_config=bundle_tokenize_config(directory),
    )


# long: one fine-tuning run in order (split, head, weights, rates, Trainer, summary); a 13-line docstring
def fit_classifier(
    task: Task,
    model: torch.nn.Module,
    vocab: Vocabulary,
    medians: GeneMedians | None,
    config: ClassifyConfig | None = None,
    train_tokens: TokenizedCells | None = None,
    tokenize_config: TokenizeConfig | None = None,
    work_dir: str | os.PathLike | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> FittedClassifier:
    """Fine-tune a classification head (and, per config, the encoder) on the task's training cells.

    Runs on the Hugging Face Trainer (AdamW, linear schedule, warmup ``min(warmup_steps,
    warmup_max_fraction × steps)``). A stratified ``validation_fraction`` of the training cells is
    held out (:func:`validation_split`); the model is evaluated on it every epoch (or every
    ``steps_per_epoch`` steps under ``max_steps``), the checkpoint with the best validation macro-F1
    is restored at the end, and training stops after ``early_stopping_patience`` evaluations
    without a gain. The head learns at its own, higher rate; the loss is class-weighted per
    ``class_weights``. Nothing of the test split is seen. ``work_dir`` (default: the temporary folder)
    receives the Trainer's scratch folder (:func:`scratch_kind`); ``callbacks`` are extra ``TrainerCallback`` s.
    The result's ``summary`` records the resolved recipe and the validation curve.
    """
    check_config(config, ClassifyConfig)
    config = config or ClassifyConfig()
    ft = config.finetune
    check_finetune_options(ft, model)
    seed = config.labels.seed if ft.seed is None else ft.seed
    if train_tokens is None:
        train_tokens = tokenize_cells(task.train_data, vocab, medians, tokenize_config, _max_len_of(model))
    keep = np.isin(task.train_rows, train_tokens.rows)
    classes = task.classes
    label_ids = pd.Index(classes).get_indexer(task.train_labels[keep])
    cells = train_tokens.select(task.train_rows[keep])
    columns = [c for c in ("input_ids", "length") if c in cells.column_names]  # length orders the probe's batches
    dataset = cells.select_columns(columns).add_column("labels", label_ids.tolist())
    split = validation_split(label_ids, ft.validation_fraction, seed)
    train_set, val_set = (dataset, None) if split is None else (dataset.select(split[0]), dataset.select(split[1]))
    first_tokens = np.asarray([ids[0] for ids in train_set["input_ids"]])
    pooling = resolve_pooling(ft.pooling, model, first_tokens, vocab.special_ids, vocab.cls_id)
    classifier = build_classifier(model, classes, vocab, dataclasses.replace(ft, pooling=pooling), seed=seed)
    weights = class_weights(np.asarray(train_set["labels"]), len(classes), ft.class_weights, ft.imbalance_ratio)
    classifier.loss_weights = None if weights is None else torch.as_tensor(weights)
    learning_rate = ft.learning_rate or default_learning_rate(int(encoder_of(model).config.hidden_size))
    head_learning_rate = ft.head_learning_rate or ft.head_lr_multiplier * learning_rate

    steps_per_epoch = math.ceil(len(train_set) / ft.batch_size)
    total_steps = ft.max_steps if ft.max_steps > 0 else math.ceil(steps_per_epoch * ft.epochs)
    warmup = min(ft.warmup_steps, int(ft.warmup_max_fraction * total_steps))
    validate = val_set is not None
    summary: dict[str, Any] = {
        "seed": int(seed),
        "n_fit": len(train_set),
        "n_validation": 0 if val_set is None else len(val_set),
        "pooling": pooling,
        "learning_rate": float(learning_rate),
        "head_learning_rate": float(head_learning_rate),
        "warmup_steps": int(warmup),
        "total_steps": int(total_steps),
        "steps_per_epoch": int(steps_per_epoch),
        "class_weights": None if weights is None else dict(zip(classes, map(float, weights), strict=True)),
        "head_init": ft.head_init,
        "selection_metric": ft.selection_metric,
        "probe_validation_macro_f1": None,
    }
    with scratch_folder(scratch_kind(work_dir)) as scratch:
        args = _training_arguments(ft, str(scratch), learning_rate, warmup, total_steps, steps_per_epoch, validate, seed)
        if ft.head_init == "probe":  # on the device it trains on: the probe embeds every training cell
            init_head_from_probe(classifier.to(args.device), train_set, vocab.pad_id, weights is not None, seed)
        extra = [StopOnDivergence("finetune"), *callbacks]
        if validate and ft.early_stopping_patience > 0:
            extra.append(EarlyStoppingCallback(early_stopping_patience=ft.early_stopping_patience))
        trainer = FinetuneTrainer(
            head_learning_rate=head_learning_rate,
            model=classifier,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=PadCollator(vocab.pad_id),
            compute_metrics=validation_metrics if validate else None,
            callbacks=extra,
        )
        # The probe-initialised start is a candidate too, scored on the validation cells as every epoch is.
        start = probe = None
        if ft.head_init == "probe" and validate:
            start = copy.deepcopy(classifier.state_dict())
            probe = {k.removeprefix("eval_"): float(v) for k, v in trainer.evaluate().items()}
            summary.update(probe_validation_macro_f1=probe["macro_f1"], probe_validation_loss=probe["loss"])
        trainer.train()
        log_history = list(trainer.state.log_history)
        if validate:
            summary.update(validation_summary(log_history, ft.selection_metric))
        summary["steps_run"] = int(trainer.state.global_step)
    classifier = trainer.model.eval()
    summary["kept"] = "trained"
    best = {"macro_f1": summary.get("best_validation_macro_f1"), "loss": summary.get("best_validation_loss")}
    # The start is kept unless an epoch beats it: on a tie it is the first of equals (as the Trainer keeps
    # the first of equal epochs), never replaced by a trained model that scores no better.
    if probe is not None and not beats(best, probe, ft.selection_metric):
        classifier.load_state_dict(start)
        summary["kept"] = "probe"
    classifier.loss_weights = None
    return FittedClassifier(classifier, classes, vocab, medians, config, log_history, summary, tokenize_config)


def scratch_kind(work_dir: str | os.PathLike | None = None) -> Path:
    """What fine-tuning's scratch folders are named after: ``WORK_DIR/mixgf-finetune-HOST`` (default
    WORK_DIR: the temporary folder). A run's is ``.mixgf-finetune-HOST.tmp-<pid>-XXXXXXXX``, removed when it
    ends; one a killed run left (its Trainer checkpoints) is removed by the next fine-tuning on HOST
    (:func:`fileio.scratch_folder`). The host name keeps machines that share WORK_DIR off each other's."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return Path(work_dir if work_dir is not None else tempfile.gettempdir()) / f"mixgf-finetune-{host}"


def _training_arguments(
    ft: FinetuneConfig,
    scratch: str,
    learning_rate: float,
    warmup: int,
    total_steps: int,
    steps_per_epoch: int,
    validate: bool,
    seed: int,
) -> OneDeviceArguments:
    """The Trainer's arguments: evaluation and a kept checkpoint every epoch when there is a validation set.

    One device, ``ft.device`` (None: ``cuda:0`` where there is CUDA): the effective batch is
    ``ft.batch_size`` on any machine, however many GPUs it has.
    """
    eval_steps = max(1, min(steps_per_epoch, total_steps))
    # "cpu:0" too; bf16 without a device on a machine without CUDA: the CPU, as fp32 (the Trainer refused it otherwise)
    on_cpu = (ft.device is not None or ft.bf16) and resolve_device(ft.device).type == "cpu"
    return OneDeviceArguments(
        device_pin=ft.device,
        output_dir=scratch,
        learning_rate=learning_rate,
        per_device_train_batch_size=ft.batch_size,
        per_device_eval_batch_size=max(64, ft.batch_size),
        num_train_epochs=ft.epochs,
        max_steps=ft.max_steps,
        warmup_steps=warmup,
        weight_decay=ft.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=max(1, min(ft.logging_steps, total_steps)),
        eval_strategy="steps" if validate else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if validate else "no",
        save_steps=eval_steps,
        save_total_limit=1 if validate else None,
        save_only_model=True,
        load_best_model_at_end=validate,
        metric_for_best_model=ft.selection_metric if validate else None,
        greater_is_better=GREATER_IS_BETTER[ft.selection_metric],
        report_to=[],
        seed=seed,
        data_seed=seed,
        bf16=ft.bf16,
        use_cpu=on_cpu,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=not on_cpu and torch.cuda.is_available(),
        disable_tqdm=True,
        logging_nan_inf_filter=False,  # a diverged loss is logged as it is, and stops the run (StopOnDivergence)
    )


def finetune(
    task: Task,
    model: torch.nn.Module,
    vocab: Vocabulary,
    medians: GeneMedians | None,
    config: ClassifyConfig | None = None,
    tokenize_config: TokenizeConfig | None = None,
    tokens: tuple[TokenizedCells, TokenizedCells] | None = None,
    method: str = "finetune",
) -> tuple[EvalResult, FittedClassifier]:
    """Fine-tune on the task's training cells and evaluate on its test cells."""
    check_config(config, ClassifyConfig)  # before any cell is tokenized
    if tokens is None:
        task, train_tokens, test_tokens = tokenize_task(task, vocab, medians, tokenize_config, _max_len_of(model))
    else:
        train_tokens, test_tokens = tokens
        task = restrict_to_tokenized(task, train_tokens, test_tokens)
    fitted = fit_classifier(task, model, vocab, medians, config, train_tokens=train_tokens, tokenize_config=tokenize_config)
    prediction = fitted.predict(test_tokens.select(task.test_rows))
    return evaluate(task, prediction, method, finetune=fitted.summary), fitted
