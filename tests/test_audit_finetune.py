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


@pytest.mark.parametrize(("section", "values", "named"), [
    ("finetune", dict(pooling="max"), "finetune.pooling"),
    ("finetune", dict(class_weights="inverse"), "finetune.class_weights"),
    ("finetune", dict(warmup_steps=-5), "finetune.warmup_steps"),
    ("finetune", dict(weight_decay=-0.1), "finetune.weight_decay"),
    ("finetune", dict(epochs=float("nan")), "finetune.epochs"),
    ("finetune", dict(epochs=float("inf")), "finetune.epochs"),
    ("embedding", dict(pooling="max"), "embedding.pooling"),
])
def test_bad_option_values_are_refused_when_the_config_is_made(section, values, named):
    # Built in Python (not from a config file, whose Literal types from_dict checks), these were
    # accepted and refused only after tokenizing every cell (and running the zero-shot methods), or
    # at the optimizer / TrainingArguments, after the probe head was fitted.
    cls = C.FinetuneConfig if section == "finetune" else C.EmbeddingConfig
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        cls(**values)


def _no_tokenizing(monkeypatch):
    from importlib import import_module

    # (classify.finetune is also the name of a function: import the modules by path)
    finetune_module, run_module, zeroshot_module = (
        import_module(f"mixgeneformer.classify.{name}") for name in ("finetune", "run", "zeroshot"))

    def refuse(*args, **kwargs):
        raise AssertionError("cells were tokenized before the options were checked")

    monkeypatch.setattr(finetune_module, "tokenize_cells", refuse)
    for module in (finetune_module, run_module, zeroshot_module):
        monkeypatch.setattr(module, "tokenize_task", refuse)


@pytest.mark.parametrize(("values", "message"), [
    (dict(device="foo"), r"finetune\.device='foo' is not a torch device"),
    (dict(device="cuda"), r"finetune\.device='cuda' was requested but CUDA is not available"),
    (dict(max_len=256), r"finetune\.max_len=256 is not used.*--max-len 256"),
    (dict(freeze_layers=9), r"finetune\.freeze_layers=9 but the model has 2 layers"),
])
def test_finetune_options_are_checked_before_any_cell_is_tokenized(monkeypatch, values, message):
    # device='foo' (or 'cuda' without CUDA) trained on the Trainer's own choice of device and was
    # refused only when the test cells were predicted, after the whole fine-tuning; max_len was
    # accepted and ignored (the cells kept the tokenize configuration's length).
    import torch

    if "cuda" in values.values() and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    adata, vocab, _ = token_task(n_per_class=6)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    model = tiny_model(vocab)
    assert model.config.num_hidden_layers == 2
    config = recipe(**{"device": None, **values})
    _no_tokenizing(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        C.fit_classifier(task, model, vocab, None, config)
    with pytest.raises(ConfigError, match=message):
        C.run_classification(adata, model, vocab, methods=("knn", "finetune"), config=config)


def test_zero_shot_checks_methods_pooling_and_device_before_tokenizing(monkeypatch):
    adata, vocab, _ = token_task(n_per_class=6)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    model = tiny_model(vocab)
    _no_tokenizing(monkeypatch)
    with pytest.raises(ConfigError, match=r"zero-shot methods \['knn', 'svm'\]"):
        C.zero_shot(task, model, vocab, None, methods=("knn", "svm"))
    with pytest.raises(ConfigError, match="not a torch device"):
        C.zero_shot(task, model, vocab, None, device="foo")


def test_a_classifier_fine_tuned_on_a_device_this_machine_lacks_predicts_here(tmp_path, caplog):
    # A classifier fine-tuned with device='cuda' (recorded in its config.yaml) could not predict on a
    # machine without CUDA unless every call passed device=: `mixgf predict` without --device ("default:
    # cuda when available") failed with "CUDA is not available".
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _, vocab, tokens = token_task(n_per_class=4)
    classes = ["type0", "type1", "type2"]
    classifier = C.build_classifier(tiny_model(vocab), classes, vocab, C.FinetuneConfig(), seed=0)
    on_gpu = C.FittedClassifier(classifier, classes, vocab, None, C.ClassifyConfig(finetune=C.FinetuneConfig(device="cuda")), [])
    expected = on_gpu.predict(tokens.dataset, device="cpu").probabilities
    loaded = C.load_classifier(on_gpu.save(tmp_path / "clf"))
    assert loaded.config.finetune.device == "cuda"
    with caplog.at_level("WARNING"):
        again = loaded.predict(tokens.dataset).probabilities
    assert np.array_equal(again, expected)
    assert "fine-tuned on device 'cuda'" in caplog.text
    with pytest.raises(ConfigError, match="not a torch device"):
        loaded.predict(tokens.dataset, device="foo")  # an explicit device is still checked


# ---------------------------------------------------------------- pins: what the audit found right


def test_optimizer_groups_follow_freezing_and_the_two_learning_rates():
    """Pin: frozen parameters are in no optimizer group; the head learns at its rate, every trainable
    encoder parameter at the width-fitted one; biases and LayerNorms without weight decay."""
    from transformers import TrainerCallback

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):  # noqa: ANN001
            names = {id(p): n for n, p in model.named_parameters()}
            self.groups = [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]

    adata, vocab, tokens = token_task(n_per_class=8)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    groups = Groups()
    fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, recipe(learning_rate=None, freeze_layers=1),
                              train_tokens=tokens, callbacks=[groups])
    encoder_lr = C.default_learning_rate(32)
    seen = [name for _, _, names in groups.groups for name in names]
    trainable = [n for n, p in fitted.model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in seen)
    assert any(n.startswith("bert.encoder.layer.1.") for n in seen)
    for lr, decay, names in groups.groups:
        head = {n.startswith("classifier.") for n in names}
        assert len(head) == 1
        assert lr == pytest.approx(10 * encoder_lr if head.pop() else encoder_lr)
        no_decay = {("bias" in n or "LayerNorm" in n) for n in names}
        assert no_decay == {decay == 0.0}


def test_validation_loss_is_the_class_weighted_training_objective():
    """Pin (documented): with class weights, the validation loss that selects under
    ``selection_metric="loss"`` is the weighted cross-entropy on the validation cells."""
    import pandas as pd

    adata, vocab, tokens = token_task(n_per_class=24)
    labels = adata.obs["cell_type1"].to_numpy()
    keep = np.sort(np.concatenate([np.flatnonzero(labels != "type2"), np.flatnonzero(labels == "type2")[:8]]))
    cells = C.TokenizedCells(dataset=tokens.dataset.select(keep), rows=np.arange(keep.size))
    task = C.within_task(adata[keep].copy(), C.LabelConfig(min_class_fraction=0))
    config = recipe(validation_fraction=0.3, class_weights="balanced", selection_metric="loss")
    fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, config, train_tokens=cells)
    summary = fitted.summary
    ids = pd.Index(task.classes).get_indexer(task.train_labels)
    _, val = C.validation_split(ids, 0.3, seed=config.labels.seed)
    probabilities = fitted.predict(cells.select(task.train_rows[val]), device="cpu").probabilities
    log_p = np.log(probabilities[np.arange(val.size), ids[val]])
    weights = np.asarray([summary["class_weights"][c] for c in task.classes])[ids[val]]
    kept = summary["probe_validation_loss"] if summary["kept"] == "probe" else summary["best_validation_loss"]
    assert kept == pytest.approx(-(weights * log_p).sum() / weights.sum(), rel=1e-4)
    assert kept != pytest.approx(-log_p.mean(), rel=1e-2)


def test_finetune_device_cpu_with_an_index_trains_on_the_cpu(tmp_path):
    # use_cpu compared the string with "cpu": device="cpu:0" let the Trainer pick CUDA where there
    # is one, while the test cells were then predicted on the CPU.
    from mixgeneformer.classify.finetune import _training_arguments

    for device in ("cpu", "cpu:0"):
        args = _training_arguments(C.FinetuneConfig(device=device), str(tmp_path), 1e-3, 0, 10, 5, True, 0)
        assert args.use_cpu and not args.dataloader_pin_memory
    assert not _training_arguments(C.FinetuneConfig(), str(tmp_path), 1e-3, 0, 10, 5, True, 0).use_cpu
