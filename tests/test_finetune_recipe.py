"""The fine-tuning recipe: validation split, class weights, best-epoch restore, head learning rate,
pooling, seeded reproducibility and the validation of the new options."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_classify import tiny_model, token_task
from transformers import TrainerCallback

from mixgeneformer import classify as C
from mixgeneformer.config import from_dict
from mixgeneformer.errors import ConfigError


def recipe(**overrides) -> C.ClassifyConfig:
    values = dict(learning_rate=3e-3, batch_size=12, epochs=4, device="cpu", logging_steps=5)
    values.update(overrides)
    return C.ClassifyConfig(labels=C.LabelConfig(min_class_fraction=0), finetune=C.FinetuneConfig(**values))


# ---------------------------------------------------------------- pure helpers


def test_validation_split_is_stratified_seeded_and_disjoint_from_test():
    adata, _, _ = token_task(n_per_class=40, n_classes=3)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    ids = pd.Index(task.classes).get_indexer(task.train_labels)
    fit, val = C.validation_split(ids, 0.1, seed=7)
    assert np.intersect1d(fit, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(ids.size))
    # 10% of each class's 32 training cells (rounded), every class on both sides.
    assert val.size == 9
    assert set(ids[val]) == set(ids[fit]) == {0, 1, 2}
    assert np.bincount(ids[val]).tolist() == [3, 3, 3]
    # Validation cells are training cells: none of them is a test cell.
    assert np.intersect1d(task.train_rows[val], task.test_rows).size == 0
    again = C.validation_split(ids, 0.1, seed=7)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(C.validation_split(ids, 0.1, seed=8)[1], val)


def test_validation_split_keeps_every_class_and_gives_up_on_singletons():
    ids = np.array([0] * 50 + [1] * 2 + [2] * 2)
    fit, val = C.validation_split(ids, 0.02, seed=0)  # 2% of 2 cells rounds to 0: one per class
    assert np.bincount(ids[val]).tolist() == [1, 1, 1] and set(ids[fit]) == {0, 1, 2}
    fit, val = C.validation_split(ids, 0.45, seed=0)
    assert np.bincount(ids[val]).tolist() == [22, 1, 1]  # never a whole class
    assert C.validation_split(np.array([0, 0, 0, 1]), 0.1, seed=0) is None
    assert C.validation_split(ids, 0.0, seed=0) is None


def test_class_weights_are_sklearn_balanced_and_auto_skips_balanced_data():
    from sklearn.utils.class_weight import compute_class_weight

    ids = np.array([0] * 60 + [1] * 30 + [2] * 10)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=ids)
    assert np.allclose(C.class_weights(ids, 3, "balanced"), expected)
    assert np.allclose(C.class_weights(ids, 3, "auto"), expected)
    assert C.class_weights(ids, 3, "none") is None
    even = np.array([0] * 20 + [1] * 18 + [2] * 21)
    assert C.class_weights(even, 3, "auto") is None
    assert C.class_weights(even, 3, "auto", imbalance_ratio=1.1) is not None
    # Weighted, every class carries the same total weight.
    weights = C.class_weights(ids, 3, "balanced")
    assert np.allclose(np.bincount(ids) * weights, ids.size / 3)
    with pytest.raises(ConfigError, match="class_weights"):
        C.class_weights(ids, 3, "inverse")


def test_default_learning_rate_scales_with_width():
    assert C.default_learning_rate(256) == pytest.approx(5e-5)
    assert C.default_learning_rate(64) > C.default_learning_rate(128) > C.default_learning_rate(256)
    assert C.default_learning_rate(8) <= 1e-3
    with pytest.raises(ConfigError):
        C.default_learning_rate(0)


def test_pooling_auto_follows_pretraining():
    _, vocab, _ = token_task(n_per_class=4)
    model = tiny_model(vocab)
    specials = vocab.special_ids
    model.config.pooling = "mean"
    assert C.resolve_pooling("auto", model) == "mean"
    for pretrained in ("cls", "pooler"):
        model.config.pooling = pretrained
        assert C.resolve_pooling("auto", model, np.array([vocab.cls_id] * 3), specials) == "cls"
        # Cells that start with a gene have no <cls> state: the mean over genes.
        assert C.resolve_pooling("auto", model, np.array([vocab.cls_id, 7]), specials) == "mean"
    assert C.resolve_pooling("mean", model) == "mean"
    with pytest.raises(ConfigError, match="pooling"):
        C.resolve_pooling("max", model)


def test_new_options_are_validated():
    for bad in (
        dict(learning_rate=0.0),
        dict(head_learning_rate=-1.0),
        dict(head_lr_multiplier=0.0),
        dict(validation_fraction=0.6),
        dict(validation_fraction=-0.1),
        dict(early_stopping_patience=-1),
        dict(imbalance_ratio=0.5),
        dict(warmup_max_fraction=1.5),
    ):
        with pytest.raises(ConfigError):
            C.FinetuneConfig(**bad)
    with pytest.raises(ConfigError, match="class_weights"):
        from_dict(C.FinetuneConfig, {"class_weights": "inverse"}, "finetune")
    with pytest.raises(ConfigError, match="pooling"):
        from_dict(C.FinetuneConfig, {"pooling": "max"}, "finetune")
    for name in ("classifier_dropout", "attention_dropout", "hidden_dropout"):
        with pytest.raises(ConfigError, match=name):
            C.FinetuneConfig(**{name: 1.0})
    with pytest.raises(ConfigError, match="selection_metric"):
        from_dict(C.FinetuneConfig, {"selection_metric": "accuracy"}, "finetune")
    config = from_dict(C.FinetuneConfig, {"learning_rate": "2e-4", "head_learning_rate": None}, "finetune")
    assert config.learning_rate == 2e-4 and config.head_learning_rate is None


def test_encoder_dropout_for_fine_tuning_replaces_the_pretrained_rates_only_when_set():
    _, vocab, _ = token_task(n_per_class=10)
    model = tiny_model(vocab)
    rates = (model.config.attention_probs_dropout_prob, model.config.hidden_dropout_prob)
    assert min(rates) > 0
    same = C.build_classifier(model, ["a", "b"], vocab, C.FinetuneConfig())
    assert (same.config.attention_probs_dropout_prob, same.config.hidden_dropout_prob) == rates
    changed = C.build_classifier(model, ["a", "b"], vocab, C.FinetuneConfig(attention_dropout=0.0, hidden_dropout=0.05))
    assert changed.config.attention_probs_dropout_prob == 0.0 and changed.config.hidden_dropout_prob == 0.05
    assert changed.bert.encoder.layer[0].attention.self.dropout.p == 0.0
    assert changed.bert.embeddings.dropout.p == 0.05
    assert (model.config.attention_probs_dropout_prob, model.config.hidden_dropout_prob) == rates  # the model is untouched


# ---------------------------------------------------------------- fine-tuning runs


class Recorder(TrainerCallback):
    """Records the optimizer's learning rates at the start of training."""

    def __init__(self) -> None:
        self.group_lrs: list[float] = []
        self.group_sizes: list[int] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
        self.group_lrs = [g["lr"] for g in optimizer.param_groups]
        self.group_sizes = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]


def test_head_learns_at_its_own_rate_and_summary_records_the_recipe():
    adata, vocab, tokens = token_task(n_per_class=20)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    model = tiny_model(vocab)
    recorder = Recorder()
    fitted = C.fit_classifier(
        task, model, vocab, None, recipe(learning_rate=1e-4, head_lr_multiplier=20.0, epochs=1),
        train_tokens=tokens, callbacks=[recorder],
    )
    head_params = sum(p.numel() for p in fitted.model.classifier.parameters())
    head_groups = [lr for lr, size in zip(recorder.group_lrs, recorder.group_sizes, strict=True) if size <= head_params]
    assert sorted(set(recorder.group_lrs)) == pytest.approx([1e-4, 2e-3])
    assert head_groups and all(lr == pytest.approx(2e-3) for lr in head_groups)
    summary = fitted.summary
    assert summary["learning_rate"] == pytest.approx(1e-4) and summary["head_learning_rate"] == pytest.approx(2e-3)
    assert summary["n_fit"] + summary["n_validation"] == task.train_rows.size
    assert summary["pooling"] == "cls"  # tiny_model is pretrained with cls pooling and cells start with <cls>
    # The default encoder rate follows the width (32 here).
    default = C.fit_classifier(task, model, vocab, None, recipe(learning_rate=None, epochs=1), train_tokens=tokens)
    assert default.summary["learning_rate"] == pytest.approx(C.default_learning_rate(32))


class Sabotage(TrainerCallback):
    """From ``start_epoch`` on, forces the head to predict class 0 for every cell."""

    def __init__(self, start_epoch: int) -> None:
        self.start_epoch = start_epoch

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        import torch

        if state.epoch is not None and state.epoch > self.start_epoch:
            with torch.no_grad():
                model.classifier.weight.zero_()
                model.classifier.bias.copy_(torch.tensor([10.0] + [0.0] * (model.classifier.bias.numel() - 1)))


def test_early_stopping_restores_the_best_epoch(tmp_path):
    adata, vocab, tokens = token_task(n_per_class=40)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = recipe(epochs=12, batch_size=8, early_stopping_patience=2, validation_fraction=0.2, class_weights="none")
    fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, config, train_tokens=tokens, callbacks=[Sabotage(3)])
    curve = [e["macro_f1"] for e in fitted.summary["validation_curve"]]
    # Good epochs first; after epoch 3 the head predicts one class (macro-F1 1/6 on three balanced
    # classes), so two evaluations after the best one training stops, long before 12 epochs.
    best = int(np.argmax(curve))
    assert curve[best] > 0.8 and best <= 2, curve
    assert len(curve) == best + 1 + 2 and curve[-1] < 0.3, curve
    assert fitted.summary["steps_run"] < fitted.summary["total_steps"]
    assert fitted.summary["best_epoch"] == best + 1
    assert fitted.summary["best_validation_macro_f1"] == max(curve)
    # The returned model is the best checkpoint: it scores the best value on the validation cells again.
    ids = pd.Index(task.classes).get_indexer(task.train_labels)
    _, val = C.validation_split(ids, 0.2, seed=config.labels.seed)
    prediction = fitted.predict(tokens.select(task.train_rows[val]), device="cpu")
    scores = C.classification_metrics(np.asarray(task.classes, dtype=object)[ids[val]], prediction.labels)
    assert scores["macro_f1"] == pytest.approx(max(curve))
    # The saved classifier shows its curves: training and validation loss, and the validation macro-F1 per epoch.
    fitted.save(tmp_path / "clf")
    assert (tmp_path / "clf" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    from mixgeneformer import plots

    log = json.loads((tmp_path / "clf" / "training_log.json").read_text())
    fig = plots.training_curves(pd.DataFrame([e for e in log if "train_loss" not in e]))
    losses, scores_ax = fig.axes[0], fig.axes[-1]
    assert {"loss", "eval_loss"} <= {line.get_label() for line in losses.lines}
    assert scores_ax.get_title() == "validation scores"
    f1 = next(line for line in scores_ax.lines if line.get_label() == "eval_macro_f1")
    assert np.allclose(f1.get_ydata(), curve)


def test_selection_by_validation_loss_restores_the_lowest_loss_epoch():
    adata, vocab, tokens = token_task(n_per_class=40)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = recipe(epochs=6, batch_size=8, early_stopping_patience=0, validation_fraction=0.2, class_weights="none",
                    selection_metric="loss")
    fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, config, train_tokens=tokens, callbacks=[Sabotage(3)])
    summary = fitted.summary
    losses = [e["loss"] for e in summary["validation_curve"]]
    # After epoch 3 the head is confidently wrong on two classes of three: the loss jumps.
    assert len(losses) == 6 and min(losses[3:]) > 2 * min(losses[:3]), losses
    assert summary["selection_metric"] == "loss" and summary["kept"] == "trained"
    assert summary["best_validation_loss"] == min(losses) and summary["best_epoch"] == int(np.argmin(losses)) + 1
    # The returned model is that checkpoint: its cross-entropy on the validation cells is the minimum.
    ids = pd.Index(task.classes).get_indexer(task.train_labels)
    _, val = C.validation_split(ids, 0.2, seed=config.labels.seed)
    prediction = fitted.predict(tokens.select(task.train_rows[val]), device="cpu")
    columns = pd.Index(prediction.classes).get_indexer(np.asarray(task.classes)[ids[val]])
    cross_entropy = -np.log(prediction.probabilities[np.arange(val.size), columns]).mean()
    assert cross_entropy == pytest.approx(min(losses), rel=1e-4)


def test_finetuning_twice_gives_identical_predictions():
    import torch

    adata, vocab, tokens = token_task(n_per_class=20)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    model = tiny_model(vocab)
    config = recipe(epochs=2)
    runs = []
    for _ in range(2):
        result, fitted = C.finetune(task, model, vocab, None, config, tokens=(tokens, tokens))
        runs.append((result, {k: v.clone() for k, v in fitted.model.state_dict().items()}))
        torch.rand(17)  # other work between two runs moves the global random state
    (first, first_state), (second, second_state) = runs
    assert np.array_equal(first.y_pred, second.y_pred)
    assert np.array_equal(first.probabilities, second.probabilities)
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key
    # Another seed gives another model.
    other, _ = C.finetune(task, model, vocab, None, recipe(epochs=2, seed=5), tokens=(tokens, tokens))
    assert not np.array_equal(other.probabilities, first.probabilities)


def test_class_weighted_loss_is_used_when_classes_are_imbalanced():
    adata, vocab, tokens = token_task(n_per_class=24)
    # Drop most cells of one class: 24 / 24 / 6.
    labels = adata.obs["cell_type1"].to_numpy()
    keep = np.concatenate([np.flatnonzero(labels != "type2"), np.flatnonzero(labels == "type2")[:6]])
    keep.sort()
    small = adata[keep].copy()
    small_tokens = C.TokenizedCells(dataset=tokens.dataset.select(keep), rows=np.arange(keep.size))
    task = C.within_task(small, C.LabelConfig(min_class_fraction=0))
    weighted = C.fit_classifier(task, tiny_model(vocab), vocab, None, recipe(epochs=1), train_tokens=small_tokens)
    weights = weighted.summary["class_weights"]
    assert weights is not None and weights["type2"] > 2 * weights["type0"]
    plain = C.fit_classifier(task, tiny_model(vocab), vocab, None, recipe(epochs=1, class_weights="none"), train_tokens=small_tokens)
    assert plain.summary["class_weights"] is None
    assert weighted.model.loss_weights is None  # training-only state is not left on the model


def test_probe_head_starts_at_the_probe_and_is_kept_when_no_epoch_beats_it():
    from mixgeneformer.classify.recipe import pooled_features

    adata, vocab, tokens = token_task(n_per_class=40)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = recipe(epochs=3, batch_size=8, validation_fraction=0.2, class_weights="none", early_stopping_patience=1)
    # From the first step on every trained epoch predicts one class: only the probe start is any good.
    fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, config, train_tokens=tokens, callbacks=[Sabotage(0)])
    summary = fitted.summary
    assert summary["head_init"] == "probe" and summary["kept"] == "probe"
    assert summary["probe_validation_macro_f1"] > 0.6 > max(e["macro_f1"] for e in summary["validation_curve"])
    # The model returned is the probe: a logistic regression (standardised, as the frozen-embedding
    # probe of the package) on the pooled embeddings of the fit cells predicts the same classes.
    ids = pd.Index(task.classes).get_indexer(task.train_labels)
    fit, val = C.validation_split(ids, 0.2, seed=config.labels.seed)
    cells = tokens.select(task.train_rows)
    features = pooled_features(fitted.model, cells, vocab.pad_id)
    labels = np.asarray(task.classes, dtype=object)[ids]
    probe = C.logreg_predict(features[fit], labels[fit], features[val])
    prediction = fitted.predict(tokens.select(task.train_rows[val]), device="cpu")
    assert np.array_equal(prediction.labels, probe.labels)
    assert C.classification_metrics(labels[val], prediction.labels)["macro_f1"] == pytest.approx(summary["probe_validation_macro_f1"])
    # A random head has no such start: the best trained epoch is kept, however bad.
    random = C.fit_classifier(task, tiny_model(vocab), vocab, None, recipe(
        epochs=3, batch_size=8, validation_fraction=0.2, class_weights="none", early_stopping_patience=1, head_init="random"),
        train_tokens=tokens, callbacks=[Sabotage(0)])
    assert random.summary["kept"] == "trained" and random.summary["probe_validation_macro_f1"] is None
    with pytest.raises(ConfigError, match="head_init"):
        C.FinetuneConfig(head_init="zeros")
