"""The `mixgf pretrain` path with the benchmark loop's settings: compiled encoder blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mixgeneformer import pretrain
from mixgeneformer.errors import ConfigError
from mixgeneformer.model import PRESETS, MixGeneformerConfig, MixGeneformerForPretraining

sys.path.insert(0, str(Path(__file__).parent))
from test_pretrain import make_vocab, tiny_config, training_data  # noqa: E402


def _tiny_model() -> MixGeneformerForPretraining:
    torch.manual_seed(0)
    config = MixGeneformerConfig(vocab_size=100, pad_token_id=0, attn_implementation="sdpa",
                                 special_token_ids=list(range(6)), **{**PRESETS["tiny"], "max_position_embeddings": 64})
    return MixGeneformerForPretraining(config).eval()


def test_compiled_blocks_keep_parameter_names_and_outputs():
    model = _tiny_model()
    ids = torch.randint(6, 100, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # a padded cell
    with torch.no_grad():
        eager = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    keys = list(model.state_dict())
    pretrain.compile_encoder_blocks(model, backend="eager")  # graph capture without the slow CPU codegen
    assert all(layer._compiled_call_impl is not None for layer in model.bert.encoder.layer)
    assert list(model.state_dict()) == keys  # checkpoints and bundles load as before
    with torch.no_grad():
        compiled = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_whole_model_and_block_compilation_are_exclusive(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "run", train={"torch_compile": True, "compile_blocks": True})
    with pytest.raises(ConfigError, match="choose one"):
        pretrain.pretrain_config_from_dict(config).validate()


def test_mixgf_pretrain_trains_with_compiled_blocks(tmp_path, monkeypatch):
    training_data(tmp_path, make_vocab(), n_cells=32)
    compiled = []
    real = pretrain.compile_encoder_blocks

    def record(model, **options):
        compiled.append(len(model.bert.encoder.layer))
        real(model, backend="eager")

    monkeypatch.setattr(pretrain, "compile_encoder_blocks", record)
    config = pretrain.pretrain_config_from_dict(
        tiny_config(tmp_path, tmp_path / "run", train={"max_steps": 3, "compile_blocks": True},
                    checkpoint={"save_steps": 3, "keep": 0})
    )
    result = pretrain.run_pretraining(config)
    assert compiled == [2] and result.global_step == 3
    rows = pretrain.read_metrics(result.run_dir)
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["tokens_per_s"] > 0 for r in rows)
    # the saved bundle has the plain parameter names (no compile wrapper prefix)
    from mixgeneformer.bundle import load_bundle

    load_bundle(result.bundle_dir)


def test_cpu_pretraining_uses_multi_tensor_adamw_with_identical_steps(tmp_path, monkeypatch):
    """On the CPU the Trainer's `adamw_torch` would run torch's one-tensor-at-a-time AdamW loop;
    pretraining asks for the multi-tensor one, which must give the same weights bit for bit."""
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from mixgeneformer import training_args

    model = _tiny_model()
    for optim, expected in (("adamw_torch", {"foreach": True}), ("adamw_torch_fused", {"fused": True})):
        cls, kwargs = training_args.multi_tensor_adamw(TrainingArguments(str(tmp_path / optim), optim=optim), model)
        assert cls is torch.optim.AdamW and expected.items() <= kwargs.items()
        assert "fused" not in kwargs if optim == "adamw_torch" else "foreach" not in kwargs

    training_data(tmp_path, make_vocab(), n_cells=32)
    made = []
    real_init = torch.optim.AdamW.__init__

    def spy(self, params, **kwargs):
        made.append(kwargs.get("foreach"))
        real_init(self, params, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    weights = {}
    for name, foreach in (("multi", True), ("loop", False)):
        if not foreach:  # the one-tensor loop the Trainer would have built
            monkeypatch.setattr(pretrain, "multi_tensor_adamw", lambda args, model: (torch.optim.AdamW, {
                **training_args.multi_tensor_adamw(args, model)[1], "foreach": False}))
        config = pretrain.pretrain_config_from_dict(
            tiny_config(tmp_path, tmp_path / name, train={"max_steps": 4}, checkpoint={"save_steps": 4, "keep": 0}))
        result = pretrain.run_pretraining(config)
        weights[name] = load_file(str(Path(result.bundle_dir) / "model.safetensors"))
    assert made == [True, False]
    assert weights["multi"].keys() == weights["loop"].keys()
    assert all(torch.equal(weights["multi"][k], weights["loop"][k]) for k in weights["multi"])
