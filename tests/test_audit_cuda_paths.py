"""Audit of the code paths that run only with CUDA GPUs or under a launcher (torchrun / accelerate launch).

This machine has no GPU. The tests check the decisions (which device a rank takes, which error is raised)
with ``torch.cuda``'s queries stood in for where that is all a path reads, and run the tensor code on
"meta" or the CPU where it does not depend on the device: nothing here pretends that a CUDA kernel ran.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mixgeneformer.devices import resolve_device
from mixgeneformer.errors import ConfigError
from mixgeneformer.sharding import rank_device, shard_role

sys.path.insert(0, str(Path(__file__).parent))
from test_audit_files import run_cli  # noqa: E402
from test_classify import C, tiny_model, token_task  # noqa: E402

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class Stop(Exception):
    """Raised by a stand-in once the decision under test has been made."""


@pytest.fixture
def gpus(monkeypatch):
    """``torch.cuda``'s answers on a node with ``n`` GPUs (the device queries only: no kernel runs)."""

    def node(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return node


def launched(monkeypatch, rank: int, world: int, local_rank: int, per_node: int) -> None:
    """The environment torchrun gives one process."""
    for name, value in zip(LAUNCH_VARIABLES, (rank, world, local_rank, per_node), strict=True):
        monkeypatch.setenv(name, str(value))


# ------------------------------------------------------------------------------ which GPU a rank uses
def test_a_rank_of_the_second_node_shards_by_rank_and_runs_on_its_local_gpu(gpus, monkeypatch):
    """2 nodes x 8 GPUs: global rank 11 is shard 11 of 16 and uses cuda:3 of its node (never cuda:11, never cuda:0)."""
    gpus(8)
    launched(monkeypatch, rank=11, world=16, local_rank=3, per_node=8)
    assert (shard_role().index, shard_role().world, shard_role().launched) == (11, 16, True)
    assert rank_device(None) == "cuda:3" and rank_device("cuda") == "cuda:3"
    assert resolve_device(rank_device(None)) == torch.device("cuda", 3)


def test_a_torch_device_cuda_under_a_launcher_means_the_ranks_own_gpu(gpus, monkeypatch):
    """rank_device kept torch.device('cuda') (it compared it with the string 'cuda'): every rank on cuda:0."""
    gpus(8)
    launched(monkeypatch, rank=5, world=8, local_rank=5, per_node=8)
    assert rank_device(torch.device("cuda")) == "cuda:5"


def test_one_gpu_asked_for_every_rank_of_a_node_is_refused(gpus, monkeypatch):
    """`torchrun --nproc_per_node 8 -m mixgeneformer embed ... --device cuda:1` ran all 8 ranks on cuda:1."""
    gpus(8)
    launched(monkeypatch, rank=2, world=8, local_rank=2, per_node=8)
    for asked in ("cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ConfigError, match=r"8 processes on this node would run every one of them on that GPU.*--device cuda"):
            rank_device(asked)
    assert rank_device("cuda:2") == "cuda:2"  # the rank's own GPU, as an API caller may compute it
    assert rank_device("cpu") == "cpu"
    launched(monkeypatch, rank=1, world=2, local_rank=0, per_node=1)  # one process per node: its GPU is the user's choice
    assert rank_device("cuda:1") == "cuda:1"


def test_more_ranks_per_node_than_gpus_is_one_clear_error(gpus, monkeypatch):
    gpus(2)
    launched(monkeypatch, rank=5, world=8, local_rank=5, per_node=8)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=5, but this node has 2 CUDA device\(s\).*--nproc_per_node 2"):
        rank_device(None)
    monkeypatch.setenv("LOCAL_RANK", "five")
    with pytest.raises(ConfigError, match="LOCAL_RANK / LOCAL_WORLD_SIZE must be integers"):
        rank_device(None)


# ------------------------------------------------------------------------------ devices this machine lacks
@pytest.mark.parametrize("device", ["mps", "meta", "xpu"])
def test_a_device_type_this_machine_lacks_is_refused(device):
    """resolve_device accepted every device type torch can name: --device mps on Linux (or meta) passed the
    early check and failed at the first tensor with a RuntimeError / AssertionError traceback."""
    if device == "mps" and torch.backends.mps.is_available() or device == "xpu" and torch.xpu.is_available():
        pytest.skip(f"this machine has a {device} device")
    with pytest.raises(ConfigError, match=rf"this machine has no {device} device; use 'cpu' or 'cuda'"):
        resolve_device(device)


@pytest.fixture
def small_h5ad(tmp_path):
    import anndata as ad

    path = tmp_path / "cells.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(path)
    return path


@pytest.mark.parametrize("command", ["embed", "predict", "perturb", "classify"])
def test_every_command_with_a_device_option_refuses_an_absent_device_first(command, small_h5ad, tmp_path, capsys, gpus):
    """On a 2-GPU machine `--device cuda:7` is one message and exit 2 before any work; `mixgf perturb` loaded
    the model and tokenized every cell first (it checked the device only when the perturbation started)."""
    gpus(2)
    missing = tmp_path / "no_such_model"
    args = {
        "embed": ["embed", small_h5ad, "--model", missing, "--out", tmp_path / "o.h5ad"],
        "predict": ["predict", small_h5ad, "--classifier", missing, "--out", tmp_path / "o.h5ad"],
        "perturb": ["perturb", small_h5ad, "--model", missing, "--out", tmp_path / "o"],
        "classify": ["classify", small_h5ad, "--model", missing, "--out", tmp_path / "o", "--label", "x"],
    }[command]
    code, err = run_cli(capsys, *args, "--device", "cuda:7")
    assert code == 2 and "Traceback" not in err
    assert "this machine has 2 CUDA device(s), cuda:0 to cuda:1" in err, err
    code, err = run_cli(capsys, *args, "--device", "meta")
    assert code == 2 and "this machine has no meta device" in err, err


def test_embed_refuses_a_rank_past_the_nodes_gpus_before_any_work(gpus, monkeypatch, tmp_path):
    """Under `torchrun --nproc_per_node 8` on a 2-GPU node, rank 5 checked the raw --device (None: 'cuda', fine)
    and failed only inside its shard, after the model was loaded and its cells read."""
    from mixgeneformer.embed import embed_sharded, embed_to_outputs

    gpus(2)
    launched(monkeypatch, rank=5, world=8, local_rank=5, per_node=8)
    with pytest.raises(ConfigError, match="LOCAL_RANK=5, but this node has 2"):
        embed_to_outputs(tmp_path / "missing.h5ad", tmp_path / "model", tmp_path / "o.h5ad")
    monkeypatch.setattr("mixgeneformer.embed.run.load_for_inference", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    launched(monkeypatch, rank=2, world=8, local_rank=1, per_node=8)
    with pytest.raises(ConfigError, match="would run every one of them on that GPU"):
        embed_sharded(tmp_path / "missing.h5ad", tmp_path / "model", tmp_path / "o.h5ad", role=shard_role(), device="cuda:0")


# ------------------------------------------------------------------------------ perturbation
def _perturbation_inputs():
    adata, vocab, tokens = token_task(n_per_class=4, n_classes=2)
    return tiny_model(vocab), vocab, tokens.dataset  # 8 cells: shard 4 of 4 holds 2


def test_perturbation_under_a_launcher_runs_each_rank_on_its_own_gpu(gpus, monkeypatch):
    """perturb_cells resolved its device without LOCAL_RANK: through the API under torchrun (RANK / WORLD_SIZE
    shard the cells) every rank took 'cuda', i.e. cuda:0. The CLI alone applied LOCAL_RANK."""
    from mixgeneformer import perturb as pt

    model, vocab, corpus = _perturbation_inputs()
    gpus(4)
    launched(monkeypatch, rank=3, world=4, local_rank=3, per_node=4)
    seen = []

    def embed_corpus(*args, **kwargs):
        seen.append(args[6])
        raise Stop

    monkeypatch.setattr("mixgeneformer.perturb.cells.embed_corpus", embed_corpus)
    with pytest.raises(Stop):
        pt.perturb_cells(model, corpus, vocab, pt.PerturbConfig(genes=[]), progress=False)
    assert seen == [torch.device("cuda", 3)]


def test_perturb_anndata_checks_the_device_before_loading_and_tokenizing(monkeypatch):
    from mixgeneformer import perturb as pt

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr("mixgeneformer.perturb.cells.load_for_inference", never)
    adata, _, _ = token_task(n_per_class=2, n_classes=2)
    with pytest.raises(ConfigError, match="no meta device"):
        pt.perturb_anndata(adata, "no_such_model", pt.PerturbConfig(device="meta"), progress=False)


def test_the_perturb_cli_keeps_the_device_of_its_config_file_under_a_launcher(gpus, monkeypatch, small_h5ad, tmp_path, capsys):
    """Under torchrun the CLI put cuda:LOCAL_RANK among its explicit options, so it replaced a --config file's
    `device: cpu` (explicit options override the file): the user's CPU run went to the GPUs."""
    from mixgeneformer import perturb as pt

    gpus(2)
    launched(monkeypatch, rank=1, world=2, local_rank=1, per_node=2)
    (tmp_path / "model").mkdir()
    config_file = tmp_path / "perturb.yaml"
    config_file.write_text("device: cpu\n")
    seen = []

    def perturb_file(input, model, config, **kwargs):
        seen.append(config.device)
        raise Stop

    monkeypatch.setattr(pt, "perturb_file", perturb_file)
    with pytest.raises(Stop):
        run_cli(capsys, "perturb", small_h5ad, "--model", tmp_path / "model", "--out", tmp_path / "o",
                "--config", config_file, "--no-progress")
    assert seen == ["cpu"]


# ------------------------------------------------------------------------------ fine-tuning
def test_the_probe_head_is_fitted_on_the_device_fine_tuning_trains_on(monkeypatch):
    """head_init='probe' (the default) embedded every training cell for the probe before the Trainer moved the
    classifier: on the CPU, however many GPUs the machine had. It now runs on the Trainer's device (args.device),
    here 'meta' standing in for a GPU."""
    import importlib

    ft_module = importlib.import_module("mixgeneformer.classify.finetune")  # the package exports a function of that name

    adata, vocab, tokens = token_task(n_per_class=6, n_classes=2)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = C.ClassifyConfig(finetune=C.FinetuneConfig(batch_size=4, max_steps=1, device="cpu"))
    seen = []

    def probe(classifier, *args, **kwargs):
        seen.append(next(classifier.parameters()).device)
        raise Stop

    monkeypatch.setattr(ft_module, "_training_arguments", lambda *a, **k: types.SimpleNamespace(device=torch.device("meta")))
    monkeypatch.setattr(ft_module, "init_head_from_probe", probe)
    with pytest.raises(Stop):
        C.fit_classifier(task, tiny_model(vocab), vocab, None, config, train_tokens=tokens)
    assert seen == [torch.device("meta")]


# ------------------------------------------------------------------------------ losses
def test_ortholog_classes_stay_on_the_device_of_the_map():
    """losses.ortholog_classes built its token ids on the CPU: a map on a GPU raised a device mismatch."""
    from mixgeneformer import losses

    table = torch.tensor([0, 1, 3, 2, -1, 6, 5])
    special = torch.tensor([True, True, False, False, False, False, False])
    expected = torch.tensor([-1, -1, 2, 2, -1, 5, 5])
    assert torch.equal(losses.ortholog_classes(table, special), expected)
    on_meta = losses.ortholog_classes(table.to("meta"), special)
    assert on_meta.device.type == "meta" and on_meta.shape == expected.shape


# ------------------------------------------------------------------------------ pretraining
def test_pretraining_arguments_build_on_a_gpu_before_ampere(monkeypatch, tmp_path):
    """training_arguments asked for tf32 wherever CUDA was available, and TrainingArguments refuses tf32 below
    Ampere ('--tf32 requires Ampere or a newer GPU arch'): `mixgf pretrain` was one ConfigError on every T4 /
    V100 / P100. The Trainer's device set-up and the GPU's properties are stood in for (a 1-GPU V100 node)."""
    from test_devices import stand_in_gpus
    from test_pretrain import tiny_config

    from mixgeneformer.pretrain import pretrain_config_from_dict
    from mixgeneformer.trainer import training_arguments

    stand_in_gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(major=7, minor=0))
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    config = pretrain_config_from_dict(tiny_config(tmp_path, tmp_path / "run"))
    args = training_arguments(config, tmp_path / "run", "fp16", has_eval=False)
    assert args.tf32 is False and args.fp16 and args.device == torch.device("cuda", 0)
