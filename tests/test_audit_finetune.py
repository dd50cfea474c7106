"""Audit of the fine-tuning internals (classify/finetune.py, recipe.py, config.py, zeroshot.py):
pooling="auto" on cells that start with a species token, options refused only after the work
(tokenization, embedding, training), an option accepted and ignored."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from test_classify import tiny_model, token_task

from mixgeneformer import classify as C
from mixgeneformer.errors import ConfigError


def recipe(**overrides) -> C.ClassifyConfig:
    values = dict(learning_rate=3e-3, batch_size=12, epochs=1, device="cpu", logging_steps=5)
    values.update(overrides)
    return C.ClassifyConfig(labels=C.LabelConfig(min_class_fraction=0), finetune=C.FinetuneConfig(**values))


def test_auto_pooling_means_over_genes_when_cells_start_with_a_species_token():
    # V1 cells with add_species_token start with <human>: a special token, but not <cls>. "auto" on a
    # model pretrained with cls / pooler pooling chose cls, and pool_cells then refused every cell
    # (ConfigError after tokenizing and building the classifier): fine-tuning could not run at all.
    adata, vocab, tokens = token_task(n_per_class=12)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    human = vocab.id_of("<human>")
    assert human in vocab.special_ids
    ids = [[human, *x[1:]] for x in tokens.dataset["input_ids"]]
    species_first = C.TokenizedCells(datasets.Dataset.from_dict({"input_ids": ids, "length": [len(x) for x in ids]}),
                                     tokens.rows)
    model = tiny_model(vocab)
    assert C.resolve_pooling("auto", model, np.array([human] * 3), vocab.special_ids, vocab.cls_id) == "mean"
    assert C.resolve_pooling("auto", model, np.array([vocab.cls_id] * 3), vocab.special_ids, vocab.cls_id) == "cls"
    for pretrained in ("cls", "pooler"):
        model.config.pooling = pretrained
        fitted = C.fit_classifier(task, model, vocab, None, recipe(), train_tokens=species_first)
        assert fitted.summary["pooling"] == "mean" and fitted.model.config.cell_pooling == "mean"
    # Cells that do start with <cls> keep the <cls> state.
    fitted = C.fit_classifier(task, model, vocab, None, recipe(), train_tokens=tokens)
    assert fitted.summary["pooling"] == "cls"
