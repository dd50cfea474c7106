"""Audit of the fine-tuning recipe against independent references: the learning rates the optimizer
actually used at each step (hand-computed warmup + linear decay), frozen weights bit-identical after
training, the training loss against torch's weighted cross-entropy with scikit-learn's "balanced"
weights of the fit cells, the probe start kept on a validation tie, a class too rare to validate,
and a classifier saved by ``save_run`` re-applied by ``mixgf predict``'s path to the test cells.

test_finetune_recipe.py / test_audit_finetune.py check the helpers and the optimizer's groups; these
tests look inside the Trainer while it trains (callbacks, one spied ``compute_loss``)."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from test_classify import tiny_bundle, tiny_model, token_task  # noqa: F401 (tiny_bundle: a fixture)
from transformers import TrainerCallback

from mixgeneformer import classify as C
from mixgeneformer.errors import ConfigError


def recipe(**overrides) -> C.ClassifyConfig:
    values = dict(learning_rate=1e-3, batch_size=8, epochs=2, device="cpu", logging_steps=50, class_weights="none")
    values.update(overrides)
    return C.ClassifyConfig(labels=C.LabelConfig(min_class_fraction=0), finetune=C.FinetuneConfig(**values))


def easy_task(n_per_class: int = 20):
    adata, vocab, tokens = token_task(n_per_class=n_per_class)
    return C.within_task(adata, C.LabelConfig(min_class_fraction=0)), vocab, tokens


class HoldAtStart(TrainerCallback):
    """After every step, puts the model back where training began (the probe start) with the head's
    logits doubled: every epoch predicts the probe's classes (the same validation macro-F1), with
    another model and another loss."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.start = {k: v.clone() for k, v in model.state_dict().items()}

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        with torch.no_grad():
            model.load_state_dict(self.start)
            model.classifier.weight.mul_(2.0)
            model.classifier.bias.mul_(2.0)


def test_probe_start_is_kept_when_the_best_epoch_only_ties_it():
    # Documented: the probe start "is kept when no epoch beats it" (and equals are resolved for the
    # first, as the Trainer does). A tie kept the trained model: `beats(probe, best)` asked the start
    # to beat the epoch, so an epoch merely as good as the probe (common: macro-F1 1.0 on both) won.
    task, vocab, tokens = easy_task()
    hold = HoldAtStart()
    config = recipe(validation_fraction=0.2, early_stopping_patience=0)
    fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, config, train_tokens=tokens, callbacks=[hold])
    summary = fitted.summary
    curve = [e["macro_f1"] for e in summary["validation_curve"]]
    assert len(curve) == 2 and all(f == summary["probe_validation_macro_f1"] for f in curve), (curve, summary)
    assert summary["kept"] == "probe"
    assert torch.equal(fitted.model.classifier.weight, hold.start["classifier.weight"])  # not the doubled head
    assert torch.equal(fitted.model.classifier.bias, hold.start["classifier.bias"])


class StepLog(TrainerCallback):
    """The learning rate of every optimizer group at each optimizer step, and the steps evaluated."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []
        self.evaluated: list[int] = []

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):  # noqa: ANN001
        self.optimizer = optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        self.head = [names[id(g["params"][0])].startswith("classifier.") for g in optimizer.param_groups]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        self.rates.append([g["lr"] for g in self.optimizer.param_groups])

    def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001
        self.evaluated.append(state.global_step)


def test_learning_rate_of_every_step_is_warmup_then_linear_decay_to_zero():
    # Reference, by hand: total = ceil(ceil(n_fit / batch) x epochs); warmup = min(warmup_steps,
    # floor(warmup_max_fraction x total)); the rate used at step s (0-based) is s / warmup of the
    # peak, then (total - s) / (total - warmup): zero after the last step. Evaluation every epoch.
    task, vocab, tokens = easy_task()
    log = StepLog()
    config = recipe(learning_rate=2e-3, head_learning_rate=7e-3, epochs=2.5, warmup_steps=3, warmup_max_fraction=0.5,
                    validation_fraction=0.1, early_stopping_patience=0, head_init="random")
    fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, config, train_tokens=tokens, callbacks=[log])
    summary = fitted.summary
    per_epoch = math.ceil(summary["n_fit"] / 8)
    total = math.ceil(per_epoch * 2.5)
    warmup = min(3, int(0.5 * total))
    assert (summary["steps_per_epoch"], summary["total_steps"], summary["warmup_steps"]) == (per_epoch, total, warmup)
    assert summary["steps_run"] == total and len(log.rates) == total
    factor = np.array([s / warmup if s < warmup else (total - s) / (total - warmup) for s in range(total)])
    rates = np.asarray(log.rates)
    for column, head in enumerate(log.head):
        assert np.allclose(rates[:, column], factor * (7e-3 if head else 2e-3), rtol=1e-9, atol=0), column
    assert rates.max() == pytest.approx(7e-3) and rates[-1, 0] == pytest.approx(2e-3 / (total - warmup))
    assert log.evaluated == [per_epoch, 2 * per_epoch, total]  # every epoch, and the last (half) one


def test_frozen_weights_are_bit_identical_after_training_and_the_rest_moves():
    task, vocab, tokens = easy_task()
    model = tiny_model(vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # No validation: the last epoch is kept, so what is returned is what trained.
    config = recipe(freeze_layers=1, validation_fraction=0.0, head_init="random", weight_decay=0.1)
    fitted = C.fit_classifier(task, model, vocab, None, config, train_tokens=tokens)
    assert fitted.summary["kept"] == "trained"
    frozen = ("bert.embeddings.", "bert.encoder.layer.0.")
    for name, value in fitted.model.state_dict().items():
        if name.startswith(frozen):
            assert torch.equal(value, before[name]), name  # not even weight decay touched them
        elif name.startswith("bert.encoder.layer.1.") and name.endswith("weight"):
            assert not torch.equal(value, before[name]), name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the pretrained model is untouched


def rare_type2_task(n_per_class: int, n_type2: int):
    """token_task's cells with only the first ``n_type2`` cells of type2: a within task, its vocabulary and tokens."""
    adata, vocab, tokens = token_task(n_per_class=n_per_class)
    labels = adata.obs["cell_type1"].to_numpy()
    keep = np.sort(np.concatenate([np.flatnonzero(labels != "type2"), np.flatnonzero(labels == "type2")[:n_type2]]))
    cells = C.TokenizedCells(dataset=tokens.dataset.select(keep), rows=np.arange(keep.size))
    return C.within_task(adata[keep].copy(), C.LabelConfig(min_class_fraction=0)), vocab, cells


def test_training_loss_is_torchs_weighted_cross_entropy_with_sklearns_balanced_weights_of_the_fit_cells(monkeypatch):
    from sklearn.utils.class_weight import compute_class_weight

    from mixgeneformer.classify import recipe as recipe_module

    task, vocab, cells = rare_type2_task(n_per_class=24, n_type2=8)
    batches = []
    compute_loss = recipe_module.FinetuneTrainer.compute_loss

    def spy(self, model, inputs, return_outputs=False, **kwargs):  # noqa: ANN001
        loss, outputs = compute_loss(self, model, inputs, return_outputs=True, **kwargs)
        if model.training:
            batches.append((loss.detach().clone(), outputs.logits.detach().clone(), inputs["labels"].clone()))
        return (loss, outputs) if return_outputs else loss

    monkeypatch.setattr(recipe_module.FinetuneTrainer, "compute_loss", spy)
    config = recipe(class_weights="auto", validation_fraction=0.2, epochs=1, head_init="random")
    C.fit_classifier(task, tiny_model(vocab), vocab, None, config, train_tokens=cells)
    ids = pd.Index(task.classes).get_indexer(task.train_labels)
    fit, _ = C.validation_split(ids, 0.2, seed=config.labels.seed)
    weights = torch.as_tensor(compute_class_weight("balanced", classes=np.arange(3), y=ids[fit]), dtype=torch.float32)
    assert weights[2] > 2 * weights[0]  # 16 / 16 / 6 fit cells: auto weights them
    for loss, logits, y in batches[:3]:
        log_p = torch.log_softmax(logits.float(), dim=-1)[torch.arange(y.numel()), y]
        expected = -(weights[y] * log_p).sum() / weights[y].sum()
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)
        if len(set(y.tolist())) > 1 and 2 in y.tolist():
            assert float(loss) != pytest.approx(float(-log_p.mean()), rel=1e-4)


def test_a_class_too_rare_to_validate_trains_every_step_without_validation(caplog):
    task, vocab, cells = rare_type2_task(n_per_class=20, n_type2=2)
    assert (task.train_labels == "type2").sum() == 1
    with caplog.at_level("WARNING"):
        fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, recipe(early_stopping_patience=1),
                                  train_tokens=cells)
    summary = fitted.summary
    assert "no validation split" in caplog.text
    assert summary["n_validation"] == 0 and summary["n_fit"] == task.train_rows.size
    assert summary["steps_run"] == summary["total_steps"] and "validation_curve" not in summary
    assert summary["kept"] == "trained" and summary["probe_validation_macro_f1"] is None


@pytest.mark.realdata
def test_saved_classifier_predicts_the_test_cells_as_classify_reported(tiny_bundle, tmp_path):  # noqa: F811
    from mixgeneformer.classify.predict import predict_file

    bundle, path, human = tiny_bundle
    config = C.ClassifyConfig(labels=C.LabelConfig(min_class_fraction=0),
                              finetune=C.FinetuneConfig(max_steps=3, batch_size=16, device="cpu", validation_fraction=0.0))
    run = C.run_classification(human, bundle, methods=("finetune",), config=config)
    C.save_run(run, tmp_path / "out")
    result, rows = run.results[0], run.task.test_rows
    predicted = predict_file(path, tmp_path / "out" / "finetuned", tmp_path / "p.h5ad", device="cpu")
    columns = pd.Index(list(predicted.uns["predicted_classes"])).get_indexer(result.classes)
    probabilities = predicted.obsm["predicted_probabilities"][rows][:, columns]
    assert np.allclose(probabilities, result.probabilities, rtol=0, atol=1e-6)
    assert np.array_equal(predicted.obs["predicted_pred"].to_numpy()[rows].astype(str), np.asarray(result.y_pred, str))
    written = ad.read_h5ad(tmp_path / "out" / "predictions.h5ad").obs
    assert np.array_equal(written["cell_type1_finetune_pred"].to_numpy()[rows].astype(str), np.asarray(result.y_pred, str))
    assert np.allclose(written["cell_type1_finetune_prob"].to_numpy()[rows], result.probabilities.max(axis=1), atol=1e-6)


def test_logging_steps_below_one_are_refused_not_clamped():
    # logging_steps=0 (or -5) was accepted and silently became 1: the loss logged every step.
    for bad in (0, -5):
        with pytest.raises(ConfigError, match=r"finetune\.logging_steps"):
            C.FinetuneConfig(logging_steps=bad)
    assert C.FinetuneConfig(logging_steps=1).logging_steps == 1


def test_device_argument_reaches_fine_tuning_unless_the_config_names_one(tiny_bundle):  # noqa: F811
    # run_classification(device="cpu") fine-tuned on config.finetune.device (None: CUDA where there is one):
    # a Python user asking for the CPU got the GPU for fine-tuning and for its predictions.
    bundle, _, human = tiny_bundle
    base = dict(labels=C.LabelConfig(min_class_fraction=0))
    ft = dict(max_steps=1, batch_size=16, validation_fraction=0.0)
    run = C.run_classification(human, bundle, methods="finetune", device="cpu",
                               config=C.ClassifyConfig(**base, finetune=C.FinetuneConfig(**ft)))
    assert run.config.finetune.device == "cpu" and run.fitted.config.finetune.device == "cpu"
    named = C.ClassifyConfig(**base, finetune=C.FinetuneConfig(**ft, device="cpu:0"))
    assert C.run_classification(human, bundle, methods="finetune", device="cpu", config=named).config.finetune.device == "cpu:0"
