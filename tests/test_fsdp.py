"""FSDP (and DeepSpeed) pretraining refused where it would not shard as asked.

Accelerate turns FSDP and DeepSpeed on only for GPU-type jobs: a torchrun job of CPU processes (gloo)
dropped the plugin without a word and trained as DDP, so ``distributed.strategy: fsdp`` on the CPU was
a DDP run under another name (FSDP1's wrapping moreover asks for an accelerator device). With FSDP2
forced on, the first step failed with torch 2.13 on any device: the tied MLM bias sits in two FSDP
groups. ``mixgf pretrain`` now refuses fsdp with torch >= 2.13 and both strategies without CUDA, before
any work, naming the fix. What can be checked here of the GPU path: the FSDP plugin settings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from mixgeneformer.cli import main
from mixgeneformer.errors import ConfigError
from mixgeneformer.pretrain import pretrain_config_from_dict, run_pretraining
from mixgeneformer.pretrain_config import DistributedOptions, _release, check_strategy_device
from mixgeneformer.trainer import training_arguments

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _torchrun  # noqa: E402
from test_pretrain import tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")


def _config(tmp_path: Path, strategy: str) -> dict:
    # No corpus or vocabulary exists: a refusal before any work comes before their checks.
    extra = {"deepspeed_config": str(tmp_path / "zero2.json")} if strategy == "deepspeed" else {}
    return tiny_config(tmp_path / "no-data", tmp_path / "run", distributed={"strategy": strategy, **extra})


FSDP_REFUSED = "distributed.strategy=fsdp fails at its first step with torch >= 2.13"


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_without_cuda_before_any_work(tmp_path, strategy):
    config = pretrain_config_from_dict(_config(tmp_path, strategy))  # the config itself is valid (GPU machines)
    refusal = FSDP_REFUSED if strategy == "fsdp" else "strategy=deepspeed needs CUDA"
    with pytest.raises(ConfigError, match=f"{refusal}.*distributed.strategy=(ddp|deepspeed)"):
        run_pretraining(config)
    assert not (tmp_path / "run").exists()  # no run folder, lock or marker: nothing was started

    check_strategy_device(DistributedOptions(strategy="deepspeed"), cuda=True)  # with GPUs: allowed
    check_strategy_device(DistributedOptions(strategy="ddp"), cuda=False)  # DDP runs on CPU processes


def test_fsdp_is_refused_with_torch_2_13_on_any_machine_and_needs_cuda_before():
    """With torch >= 2.13 FSDP2's first step fails on the tied MLM bias (two FSDP groups), GPUs or not;
    with an older torch it is still refused without CUDA (Accelerate would train as DDP)."""
    fsdp = DistributedOptions(strategy="fsdp")
    for version in ("2.13.0", "2.13.0+cu128", "2.14.1", "3.0.0"):
        with pytest.raises(ConfigError, match=FSDP_REFUSED):
            check_strategy_device(fsdp, cuda=True, torch_version=version)
    check_strategy_device(fsdp, cuda=True, torch_version="2.12.1+cu126")  # not known to fail: allowed
    with pytest.raises(ConfigError, match="strategy=fsdp needs CUDA"):
        check_strategy_device(fsdp, cuda=False, torch_version="2.12.1")
    if _release(None) >= (2, 13):  # the installed torch (the CPU pin is 2.13)
        with pytest.raises(ConfigError, match=FSDP_REFUSED):
            check_strategy_device(fsdp, cuda=True)


def test_cli_refuses_fsdp_on_cpu_with_one_message(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_config(tmp_path, "fsdp")))
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--config", str(tmp_path / "run.yaml")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert FSDP_REFUSED in err and "strategy=deepspeed" in err and "ddp" in err and "Traceback" not in err


def test_two_gloo_ranks_asked_for_fsdp_stop_at_once(tmp_path):
    """The case that trained as DDP before: torchrun over two CPU processes with strategy fsdp. Every
    rank refuses before touching the corpus; the job ends quickly, no run folder, no rank finished."""
    config = _config(tmp_path, "fsdp")
    proc, elapsed, reports = _torchrun(tmp_path, config, timeout=120)
    assert proc.returncode != 0
    assert FSDP_REFUSED in proc.stdout + proc.stderr
    assert not list(reports.glob("*.json"))
    assert not (tmp_path / "run").exists()
    assert elapsed < 90


def test_fsdp_settings_reach_the_fsdp_plugin(tmp_path):
    """What a GPU run's Accelerate FSDP plugin gets from distributed.*: FSDP2, full sharding (parameters
    resharded after forward), one unit per BertLayer, full (gathered) state dicts in checkpoints."""
    config = pretrain_config_from_dict(_config(tmp_path, "fsdp"))
    args = training_arguments(config, tmp_path / "run", "fp32", has_eval=False)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "BertLayer"
    assert plugin["reshard_after_forward"] is True  # full_shard
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert not plugin.get("cpu_offload")

    grad_op = pretrain_config_from_dict(tiny_config(tmp_path, tmp_path / "r2", distributed={
        "strategy": "fsdp", "fsdp": "shard_grad_op auto_wrap", "fsdp_wrap_layer": "BertLayer"}))
    assert training_arguments(grad_op, tmp_path / "r2", "fp32", False).fsdp_plugin_args["reshard_after_forward"] is False
    ddp = pretrain_config_from_dict(tiny_config(tmp_path, tmp_path / "r3"))
    assert training_arguments(ddp, tmp_path / "r3", "fp32", False).fsdp_plugin_args is None
