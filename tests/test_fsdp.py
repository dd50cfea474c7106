"""FSDP pretraining: Accelerate's FSDP2 with the tied MLM head in one group (:mod:`mixgeneformer.fsdp`).

Accelerate's own FSDP2 wrapping put the tied word embeddings and the MLM decoder in one group and
``cls.predictions.bias`` (the decoder's bias) in the root group; torch >= 2.13 refuses a parameter in
two groups, so the first step failed on any device. The package now shards the model itself before
Accelerate prepares it (one group per BertLayer, embeddings + MLM head as one group, then the root),
and a checkpoint's ``model.safetensors`` holds the gathered full tensors in DDP's layout.

Accelerate enables FSDP only for GPU-type jobs: a torchrun job of CPU processes (gloo) drops the plugin
and trains as DDP. ``mixgf pretrain`` therefore still refuses fsdp and deepspeed without CUDA, before
any work. To run the FSDP2 path here, the two-rank test forces Accelerate's FSDP state on in its worker
script only (``distributed_type`` FSDP, as Accelerate sets it on GPUs), then trains, evaluates, saves,
resumes and compares with DDP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixgeneformer import checkpoints as ckpt
from mixgeneformer.cli import main
from mixgeneformer.errors import ConfigError
from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining
from mixgeneformer.pretrain_config import DistributedOptions, check_strategy_device
from mixgeneformer.trainer import training_arguments

sys.path.insert(0, str(Path(__file__).parent))
import test_distributed  # noqa: E402
from test_audit_pretrain_paths import ortholog_corpus, ortholog_vocab  # noqa: E402
from test_distributed import _torchrun  # noqa: E402
from test_pretrain import tiny_config, training_data  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")


def _config(tmp_path: Path, strategy: str) -> dict:
    # No corpus or vocabulary exists: a refusal before any work comes before their checks.
    extra = {"deepspeed_config": str(tmp_path / "zero2.json")} if strategy == "deepspeed" else {}
    return tiny_config(tmp_path / "no-data", tmp_path / "run", distributed={"strategy": strategy, **extra})


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_without_cuda_before_any_work(tmp_path, strategy):
    config = pretrain_config_from_dict(_config(tmp_path, strategy))  # the config itself is valid (GPU machines)
    with pytest.raises(ConfigError, match=f"strategy={strategy} needs CUDA.*distributed.strategy=ddp"):
        run_pretraining(config)
    assert not (tmp_path / "run").exists()  # no run folder, lock or marker: nothing was started

    check_strategy_device(DistributedOptions(strategy=strategy), cuda=True)  # with GPUs: allowed (any torch)
    check_strategy_device(DistributedOptions(strategy="ddp"), cuda=False)  # DDP runs on CPU processes


def test_fsdp_with_transformers_4_is_refused_before_any_work():
    """transformers 4.x runs FSDP1, which mixgeneformer.fsdp's grouping of the tied MLM head does not cover
    (the package allows transformers >= 4.46): refused on GPU machines too, naming the fix."""
    fsdp, deepspeed = DistributedOptions(strategy="fsdp"), DistributedOptions(strategy="deepspeed")
    with pytest.raises(ConfigError, match=r"strategy=fsdp needs transformers >= 5 .*4\.57\.1.*strategy=deepspeed"):
        check_strategy_device(fsdp, cuda=True, transformers_version="4.57.1")
    check_strategy_device(fsdp, cuda=True, transformers_version="5.0.0")
    check_strategy_device(deepspeed, cuda=True, transformers_version="4.57.1")


def test_cli_refuses_fsdp_on_cpu_with_one_message(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_config(tmp_path, "fsdp")))
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--config", str(tmp_path / "run.yaml")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "strategy=fsdp needs CUDA" in err and "strategy=ddp" in err and "Traceback" not in err


def test_two_gloo_ranks_asked_for_fsdp_stop_at_once(tmp_path):
    """The case that trained as DDP before: torchrun over two CPU processes with strategy fsdp (Accelerate
    not forced). Every rank refuses before touching the corpus; no run folder, no rank finished."""
    proc, elapsed, reports = _torchrun(tmp_path, _config(tmp_path, "fsdp"), timeout=120)
    assert proc.returncode != 0
    assert "strategy=fsdp needs CUDA" in proc.stdout + proc.stderr
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
    assert not plugin.get("cpu_ram_efficient_loading")  # mixgeneformer.fsdp.shard_model refuses it

    grad_op = pretrain_config_from_dict(tiny_config(tmp_path, tmp_path / "r2", distributed={
        "strategy": "fsdp", "fsdp": "shard_grad_op auto_wrap", "fsdp_wrap_layer": "BertLayer"}))
    assert training_arguments(grad_op, tmp_path / "r2", "fp32", False).fsdp_plugin_args["reshard_after_forward"] is False
    ddp = pretrain_config_from_dict(tiny_config(tmp_path, tmp_path / "r3"))
    assert training_arguments(ddp, tmp_path / "r3", "fp32", False).fsdp_plugin_args is None


# Runs inside each rank: FSDP2 forced on (this worker only), three runs of one config: DDP (first: the forced
# state would outlive an FSDP run in this process), FSDP straight, FSDP resumed from the straight run's middle
# checkpoint. Dumps what the test checks.
FSDP_WORKER = r'''
import json, os, sys
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
import mixgeneformer.pretrain as pretrain
import mixgeneformer.trainer as trainer_module
from mixgeneformer.pretrain_config import check_strategy_device

init = AcceleratorState.__init__
def forced(self, *args, fsdp_plugin=None, **kwargs):  # what Accelerate does for GPU-type jobs
    init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # Accelerate's get_state_dict reads it
AcceleratorState.__init__ = forced
pretrain.check_strategy_device = lambda distributed, cuda: check_strategy_device(distributed, True)

sharded = []
shard_model = trainer_module.shard_model
def recording(accelerator, model):
    done = shard_model(accelerator, model)
    if done:
        emb = model.bert.embeddings.word_embeddings.weight
        bias = model.cls.predictions.bias
        sharded.append({"rows": [emb.to_local().shape[0], emb.shape[0]], "dtensor": isinstance(emb, DTensor),
                        "bias_tied": bias is model.cls.predictions.decoder.bias,
                        "layer": isinstance(model.bert.encoder.layer[0].attention.self.query.weight, DTensor)})
    return done
trainer_module.shard_model = recording

config = pretrain.load_pretrain_config(sys.argv[1])
report = {"rank": int(os.environ["RANK"]), "runs": {}}
out = config.output_dir
for name, strategy, resume_from in (("ddp", "ddp", None), ("fsdp", "fsdp", None), ("resumed", "fsdp", "fsdp/checkpoint-2")):
    config.output_dir, config.distributed.strategy = os.path.join(out, name), strategy
    sharded.clear()
    result = pretrain.run_pretraining(config, resume_from=os.path.join(out, resume_from) if resume_from else None)
    report["runs"][name] = {"step": result.global_step, "sharded": list(sharded)}
with open(os.path.join(os.environ["REPORT_DIR"], f"rank{report['rank']}.json"), "w") as handle:
    json.dump(report, handle)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def ortholog_root(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("fsdp-corpus"), ortholog_vocab(), ortholog_corpus)


def test_fsdp2_on_two_cpu_ranks_trains_saves_and_resumes_like_ddp(tmp_path, ortholog_root, monkeypatch):
    """Two gloo ranks, FSDP2 forced on, held-out evaluation and the cross-species term: every parameter is
    sharded (the tied embeddings / decoder / MLM bias in one group), complete checkpoints hold full float32
    tensors in DDP's layout, a run resumed from the middle checkpoint (weights and optimizer state) ends
    where the straight run ends, and the weights equal a DDP run's up to float rounding."""
    config = tiny_config(ortholog_root, tmp_path / "runs", train={"max_steps": 4, "per_device_batch_size": 4},
                         data={"eval_fraction": 0.25}, logging={"eval_steps": 2},
                         objective={"cross_species_weight": 0.5, "cross_species_queue": 16, "pooling": "mean"},
                         checkpoint={"save_steps": 2, "keep": 0}, distributed={"timeout_s": 60})
    monkeypatch.setattr(test_distributed, "WORKER", FSDP_WORKER)
    proc, _, reports = _torchrun(tmp_path, config, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((reports / f"rank{r}.json").read_text())["runs"] for r in (0, 1))
    for runs in (r0, r1):
        assert {name: run["step"] for name, run in runs.items()} == {"fsdp": 4, "resumed": 4, "ddp": 4}
        for name in ("fsdp", "resumed"):  # sharded, not DDP under another name: half the embedding rows per rank
            assert runs[name]["sharded"] == [{"rows": [23, 46], "dtensor": True, "bias_tied": True, "layer": True}]
        assert runs["ddp"]["sharded"] == []

    runs = tmp_path / "runs"
    for name in ("fsdp", "resumed", "ddp"):
        rows = read_metrics(runs / name)
        train = [r for r in rows if "loss" in r]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
        assert all(r["cross_species_loss"] > 0 for r in train)  # the cross-species term is at work
        evaluated = [r["step"] for r in rows if "eval_loss" in r]
        assert evaluated == ([4] if name == "resumed" else [2, 4])  # held-out evaluation ran (resumed: after step 2)
        assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in rows if "eval_loss" in r)
    straight = read_metrics(runs / "fsdp")
    resumed_rows = [r["loss"] for r in read_metrics(runs / "resumed") if "loss" in r]
    assert resumed_rows[-2:] == [r["loss"] for r in straight if "loss" in r][-2:]  # steps 3 and 4, as the straight run

    ddp_keys = set(load_file(str(runs / "ddp" / "checkpoint-2" / "model.safetensors")))
    for step in (2, 4):
        folder = runs / "fsdp" / f"checkpoint-{step}"
        assert ckpt.checkpoint_problem(folder) is None
        weights = load_file(str(folder / "model.safetensors"))  # plain full tensors (a DTensor would not load)
        assert set(weights) == ddp_keys and all(w.dtype == torch.float32 for w in weights.values())

    fsdp, resumed, ddp = (load_file(str(runs / name / "model" / "model.safetensors")) for name in ("fsdp", "resumed", "ddp"))
    assert set(fsdp) == set(ddp) == ddp_keys
    for key in ddp:
        torch.testing.assert_close(resumed[key], fsdp[key], rtol=0, atol=1e-7)  # resume: weights and optimizer state
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-5)  # FSDP = DDP up to float rounding
    _check_bundle(runs / "fsdp" / "model", fsdp)


def _check_bundle(bundle: Path, weights: dict[str, torch.Tensor]) -> None:
    import transformers

    from mixgeneformer.bundle import load_bundle

    model, _vocab, _medians = load_bundle(bundle)
    state = model.state_dict()
    torch.testing.assert_close(state["bert.embeddings.word_embeddings.weight"], weights["bert.embeddings.word_embeddings.weight"])
    plain = transformers.BertForMaskedLM.from_pretrained(str(bundle))
    assert torch.equal(plain.cls.predictions.decoder.weight, plain.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(plain.bert.embeddings.word_embeddings.weight, weights["bert.embeddings.word_embeddings.weight"], rtol=0, atol=0)
    torch.testing.assert_close(plain.cls.predictions.decoder.bias, weights["cls.predictions.bias"], rtol=0, atol=0)
