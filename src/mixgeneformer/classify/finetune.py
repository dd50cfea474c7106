"""Fine-tuning a classification head (model.MixGeneformerForCellClassification) on the Hugging Face Trainer."""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from transformers import Trainer, TrainingArguments

from ..config import load_config, save_config
from ..errors import ConfigError
from ..fileio import atomic_directory, check_readable_file, read_json, write_json
from ..inference import encoder_of, length_order, pad_batch, resolve_device
from ..medians import GeneMedians
from ..model import MixGeneformerForCellClassification
from ..vocab import Vocabulary
from .config import ClassifyConfig, FinetuneConfig
from .metrics import EvalResult, Prediction, _argmax_labels, evaluate
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

    from ..tokenize import TokenizeConfig


def build_classifier(model: torch.nn.Module, classes: Sequence[str], vocab: Vocabulary, config: FinetuneConfig | None = None) -> Any:
    """A classification model initialised from ``model``'s encoder, with layers frozen per ``config``.

    ``config.train_encoder=False`` trains only the head; ``config.freeze_layers=k`` freezes the
    embeddings and the bottom ``k`` encoder layers.
    """


    config = config or FinetuneConfig()
    bert = encoder_of(model)
    n_layers = len(bert.encoder.layer)
    if config.freeze_layers > n_layers:
        raise ConfigError(f"finetune.freeze_layers={config.freeze_layers} but the model has {n_layers} layers.")
    model_config = copy.deepcopy(bert.config)
    model_config.num_labels = len(classes)
    model_config.id2label = dict(enumerate(classes))
    model_config.label2id = {c: i for i, c in enumerate(classes)}
    model_config.cell_pooling = config.pooling
    model_config.classifier_dropout = config.classifier_dropout
    model_config.special_token_ids = [int(i) for i in vocab.special_ids]
    model_config.vocab_hash = vocab.hash
    classifier = MixGeneformerForCellClassification(model_config)
    missing, unexpected = classifier.bert.load_state_dict(bert.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ConfigError(f"encoder weights do not fit the classifier: missing {missing}, unexpected {unexpected}.")
    trainable = config.train_encoder
    for parameter in classifier.bert.parameters():
        parameter.requires_grad = trainable
    if trainable and config.freeze_layers:
        for module in (classifier.bert.embeddings, *classifier.bert.encoder.layer[: config.freeze_layers]):
            for parameter in module.parameters():
                parameter.requires_grad = False
    return classifier


class _PadCollator:
    """Pad a batch of token sequences to its longest cell; labels as int64."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:

        lengths = np.asarray([len(f["input_ids"]) for f in features], dtype=np.int64)
        flat = np.concatenate([np.asarray(f["input_ids"], dtype=np.int64) for f in features])
        ids, mask = pad_batch(flat, np.cumsum(lengths) - lengths, lengths, self.pad_id)
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if "labels" in features[0]:
            batch["labels"] = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


@dataclass
class FittedClassifier:
    """A fine-tuned classifier, its classes and its training log."""

    model: Any
    classes: list[str]
    vocab: Any
    medians: Any
    config: ClassifyConfig
    log_history: list[dict[str, Any]]

    def predict(self, dataset: Any, batch_size: int = 64, device: str | None = None) -> Prediction:
        """Class probabilities of every cell of a tokenized corpus (length-sorted batches)."""


        torch_device = resolve_device(device or self.config.finetune.device)
        lengths = np.asarray(dataset.with_format("numpy")["length"]) if "length" in dataset.column_names else None
        order = length_order(lengths) if lengths is not None else np.arange(len(dataset))
        collate = _PadCollator(self.vocab.pad_id)
        probabilities = np.zeros((len(dataset), len(self.classes)), dtype=np.float32)
        model = self.model.to(torch_device).eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate([{"input_ids": x} for x in dataset.select(rows)["input_ids"]])
                logits = model(**{k: v.to(torch_device) for k, v in batch.items()}).logits
                probabilities[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return Prediction(_argmax_labels(probabilities, self.classes), probabilities, list(self.classes))

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Any:
        """Write ``model/`` (config.json + model.safetensors only), ``vocab.json``, ``medians.tsv``,
        ``config.yaml`` and ``training_log.json`` atomically."""


        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.model.save_pretrained(tmp / "model", safe_serialization=True)
            self.vocab.save(tmp / "vocab.json")
            if self.medians is not None:
                self.medians.save(tmp / "medians.tsv")
            save_config(self.config, tmp)
            write_json(tmp / "training_log.json", self.log_history)
        return Path(directory)


def load_classifier(directory: str | os.PathLike) -> FittedClassifier:
    """Load a classifier saved by :meth:`FittedClassifier.save` (safetensors only)."""


    directory = Path(directory)
    check_readable_file(directory / "model" / "model.safetensors", "classifier weights")
    vocab = Vocabulary.load(check_readable_file(directory / "vocab.json", "classifier vocabulary"))
    model = MixGeneformerForCellClassification.from_pretrained(directory / "model", use_safetensors=True)
    medians = GeneMedians.load(directory / "medians.tsv") if (directory / "medians.tsv").exists() else None
    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return FittedClassifier(
        model=model.eval(),
        classes=classes,
        vocab=vocab,
        medians=medians,
        config=load_config(ClassifyConfig, directory / "config.yaml"),
        log_history=read_json(directory / "training_log.json", "training log"),
    )


def fit_classifier(
    task: Task,
    model: torch.nn.Module,
    vocab: Vocabulary,
    medians: GeneMedians | None,
    config: ClassifyConfig | None = None,
    train_tokens: TokenizedCells | None = None,
    tokenize_config: TokenizeConfig | None = None,
    work_dir: str | os.PathLike | None = None,
) -> FittedClassifier:
    """Fine-tune a classification head (and, per config, the encoder) on the task's training cells.

    Runs on the Hugging Face Trainer: AdamW, linear schedule with warmup ``min(warmup_steps,
    warmup_max_fraction × steps)``, lr 5e-5, batch 12 by default. Nothing of the test split is
    seen. ``work_dir`` receives the Trainer's scratch files (a temporary folder by default).
    """


    config = config or ClassifyConfig()
    ft = config.finetune
    if train_tokens is None:
        train_tokens = tokenize_cells(task.train_data, vocab, medians, tokenize_config, _max_len_of(model))
    keep = np.isin(task.train_rows, train_tokens.rows)
    classes = task.classes
    label_ids = pd.Index(classes).get_indexer(task.train_labels[keep])
    dataset = train_tokens.select(task.train_rows[keep]).select_columns(["input_ids"]).add_column("labels", label_ids.tolist())
    classifier = build_classifier(model, classes, vocab, ft)

    steps_per_epoch = math.ceil(len(dataset) / ft.batch_size)
    total_steps = ft.max_steps if ft.max_steps > 0 else math.ceil(steps_per_epoch * ft.epochs)
    warmup = min(ft.warmup_steps, int(ft.warmup_max_fraction * total_steps))
    with tempfile.TemporaryDirectory(prefix="mixgf-finetune-", dir=work_dir) as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            learning_rate=ft.learning_rate,
            per_device_train_batch_size=ft.batch_size,
            num_train_epochs=ft.epochs,
            max_steps=ft.max_steps,
            warmup_steps=warmup,
            weight_decay=ft.weight_decay,
            lr_scheduler_type="linear",
            logging_steps=max(1, min(ft.logging_steps, total_steps)),
            save_strategy="no",
            report_to=[],
            seed=config.labels.seed,
            data_seed=config.labels.seed,
            bf16=ft.bf16,
            use_cpu=(ft.device == "cpu"),
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=ft.device != "cpu" and torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = Trainer(model=classifier, args=args, train_dataset=dataset, data_collator=_PadCollator(vocab.pad_id))
        trainer.train()
        log_history = list(trainer.state.log_history)
    classifier = trainer.model.eval()
    return FittedClassifier(classifier, classes, vocab, medians, config, log_history)


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
    if tokens is None:
        task, train_tokens, test_tokens = tokenize_task(task, vocab, medians, tokenize_config, _max_len_of(model))
    else:
        train_tokens, test_tokens = tokens
        task = restrict_to_tokenized(task, train_tokens, test_tokens)
    fitted = fit_classifier(task, model, vocab, medians, config, train_tokens=train_tokens)
    prediction = fitted.predict(test_tokens.select(task.test_rows))
    return evaluate(task, prediction, method), fitted
