"""Audit of the bf16 paths (the default precision of pretraining, embedding and prediction on a GPU with
native bf16), run here on the CPU under explicit bf16 settings: PyTorch's CPU autocast computes in bf16 too."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixgeneformer.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_classify import C, tiny_model, token_task  # noqa: E402


# ------------------------------------------------------------------------------------------ fine-tuning
def _finetune(bf16: bool, device: str | None = "cpu", max_steps: int = 2):
    adata, vocab, tokens = token_task(n_per_class=12)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = C.ClassifyConfig(finetune=C.FinetuneConfig(
        learning_rate=1e-4, batch_size=12, max_steps=max_steps, device=device, logging_steps=1, bf16=bf16))
    result, fitted = C.finetune(task, tiny_model(vocab), vocab, None, config, tokens=(tokens, tokens))
    return task, tokens, result, fitted


def test_finetune_bf16_without_a_device_trains_on_the_cpu_and_predicts_what_classify_reported(tmp_path):
    """finetune.bf16=true without finetune.device on a machine without CUDA raised the Trainer's ValueError
    ("Your setup doesn't support bf16/gpu"), after the cells were tokenized; fp32 trains there on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("the CPU fallback of device=None is what this machine lacks")
    task, tokens, result, fitted = _finetune(bf16=True, device=None)
    assert fitted.summary["steps_run"] == 2
    assert {p.dtype for p in fitted.model.parameters()} == {torch.float32}  # master weights stay float32
    loaded = C.load_classifier(fitted.save(tmp_path / "clf"))
    again = loaded.predict(tokens.select(task.test_rows), device="cpu")
    assert np.array_equal(again.labels, result.y_pred)


def test_the_probe_initialised_head_scores_alike_under_bf16():
    """The head ran in bf16 under the Trainer's bf16 autocast. Its probe initialisation folds the feature
    standardisation into the bias, so the logits are differences of large terms: the probe's validation loss
    was 5x the float32 one (0.156 against 0.031) and the probe-vs-trained choice compared rounding noise."""
    losses = {}
    for bf16 in (False, True):
        _, _, _, fitted = _finetune(bf16=bf16, max_steps=1)
        losses[bf16] = fitted.summary["probe_validation_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=0.05), losses


def test_the_classification_head_computes_in_float32_under_autocast():
    _, vocab, tokens = token_task(n_per_class=2)
    model = C.build_classifier(tiny_model(vocab), ["a", "b"], vocab, C.FinetuneConfig(pooling="mean"), seed=0).eval()
    ids = torch.as_tensor([tokens.dataset[i]["input_ids"][:8] for i in range(4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    assert logits.dtype == torch.float32


def test_finetune_bf16_on_a_gpu_without_bf16_is_one_config_error(monkeypatch):
    """Refused before any cell is tokenized, naming the option (the Trainer's ValueError came after the probe)."""
    from mixgeneformer.classify.finetune import check_finetune_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100")
    with pytest.raises(ConfigError, match=r"finetune\.bf16=true, but Tesla P100.*set finetune\.bf16=false"):
        check_finetune_options(C.FinetuneConfig(bf16=True, device="cuda"))
    check_finetune_options(C.FinetuneConfig(bf16=False, device="cuda"))
