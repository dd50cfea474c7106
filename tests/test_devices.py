"""One process trains on one device: the device asked for, never DataParallel over every visible GPU.

This machine has no GPU, so the tests stand in for CUDA at the two points the package reads it:
the Trainer's own device set-up (a 4-GPU machine, the Trainer's default ``cuda:0`` with
``n_gpu=4``) and ``torch.cuda``'s device queries.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from mixgeneformer.devices import resolve_device
from mixgeneformer.errors import ConfigError
from mixgeneformer.training_args import OneDeviceArguments


def stand_in_gpus(monkeypatch, n_gpu: int) -> list[torch.device]:
    """A one-process run on a machine with ``n_gpu`` GPUs, as the HF Trainer sets it up (cuda:0, n_gpu);
    returns the list the devices passed to ``torch.cuda.set_device`` are appended to."""
    chosen: list[torch.device] = []

    def trainer_default(self):
        self._n_gpu = n_gpu
        self.distributed_state = None
        return torch.device("cuda:0")

    monkeypatch.setattr(transformers.TrainingArguments, "_setup_devices", property(trainer_default))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpu)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(torch.device(device)))
    return chosen


class StandInGPUs:
    """``torch.cuda``'s queries on a machine of GPUs with their own bf16 ability, one of ``"native"``
    (Ampere and later), ``"emulated"`` (T4, V100) or ``"none"`` (P100): ``is_bf16_supported``
    answers for the current GPU, as torch's does, and ``torch.cuda.device(i)`` switches it."""

    def __init__(self, monkeypatch, bf16: list[str], names: list[str] | None = None):
        self.bf16, self.names, self.current = bf16, names or [f"GPU {i}" for i in range(len(bf16))], 0
        stand_in = self

        class device:  # torch.cuda.device: the current GPU within the block
            def __init__(self, which):
                self.index = torch.device(which).index if not isinstance(which, int) else which

            def __enter__(self):
                self.before = stand_in.current
                stand_in.current = stand_in.current if self.index is None else self.index

            def __exit__(self, *exc):
                stand_in.current = self.before

        def is_bf16_supported(including_emulation=True):
            kind = stand_in.bf16[stand_in.current]
            return kind == "native" or (including_emulation and kind == "emulated")

        def get_device_name(which=None):
            index = stand_in.current if which is None else torch.device(which).index
            return stand_in.names[stand_in.current if index is None else index]

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(bf16))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: stand_in.current)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "get_device_name", get_device_name)


@pytest.fixture
def four_gpus(monkeypatch):
    """A one-process run on a machine with 4 GPUs: cuda:0, n_gpu 4."""
    return stand_in_gpus(monkeypatch, 4)


def test_the_device_asked_for_is_the_one_trained_on(four_gpus, tmp_path):
    args = OneDeviceArguments(output_dir=str(tmp_path), device_pin="cuda:1", per_device_train_batch_size=32)
    assert args.device == torch.device("cuda", 1)
    assert four_gpus[-1] == torch.device("cuda", 1)
    # No DataParallel: the batch the recipe names is the batch trained on, whatever the GPU count.
    assert args.n_gpu == 1
    assert args.train_batch_size == 32


def test_no_device_asked_trains_on_the_first_and_says_how_to_use_all(four_gpus, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mixgeneformer.training_args"):
        args = OneDeviceArguments(output_dir=str(tmp_path), per_device_train_batch_size=16)
    assert args.device == torch.device("cuda", 0)
    assert (args.n_gpu, args.train_batch_size) == (1, 16)
    assert "4 GPUs are visible" in caplog.text and "torchrun --nproc_per_node 4" in caplog.text


def test_cpu_runs_are_left_alone(tmp_path):
    args = OneDeviceArguments(output_dir=str(tmp_path), use_cpu=True, device_pin="cpu")
    assert args.device == torch.device("cpu")
    assert args.n_gpu == 0


def test_a_cuda_index_the_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_bf16_is_judged_on_the_gpu_asked_for_not_the_current_one(monkeypatch):
    """A machine mixing GPU generations (cuda:0 an A100, cuda:1 a P100 without bf16): torch's
    is_bf16_supported() answers for the current GPU, cuda:0, so `--device cuda:1` got embedding's
    "auto" bf16 and fine-tuning's bf16 let through, on a GPU that cannot compute in it."""
    from mixgeneformer.classify.finetune import FinetuneConfig, check_finetune_options
    from mixgeneformer.devices import autocast_dtype, cuda_bf16

    gpus = StandInGPUs(monkeypatch, ["native", "none", "emulated"], ["NVIDIA A100", "Tesla P100", "Tesla V100"])
    assert autocast_dtype(torch.device("cuda:0"), "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda:1"), "auto") is None
    assert autocast_dtype(torch.device("cuda:2"), "auto") is None  # emulated only: fp32
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16  # the current GPU, cuda:0
    assert [cuda_bf16(torch.device(f"cuda:{i}")) for i in range(3)] == [True, False, True]
    assert gpus.current == 0  # asked, then put back
    with pytest.raises(ConfigError, match=r"finetune\.bf16=true, but Tesla P100"):
        check_finetune_options(FinetuneConfig(bf16=True, device="cuda:1"))
    check_finetune_options(FinetuneConfig(bf16=True, device="cuda:2"))  # emulated: runs, slower
    check_finetune_options(FinetuneConfig(bf16=True, device="cuda:0"))
    gpus.current = 1  # the same question with the P100 current: cuda:0 still computes in bf16
    assert autocast_dtype(torch.device("cuda:0"), "auto") is torch.bfloat16
    check_finetune_options(FinetuneConfig(bf16=True, device="cuda:0"))
