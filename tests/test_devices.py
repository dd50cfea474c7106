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

from mixgeneformer.errors import ConfigError
from mixgeneformer.inference import resolve_device
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
