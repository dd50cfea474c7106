"""Where and in what precision the encoder runs: the device a user names, bf16 support of that
device, the autocast dtype of a ``precision`` and the numerics of a forward pass (no files, no models
built here). Shared by inference, fine-tuning and pretraining."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ConfigError
from .parallel import backend_available

Precision = Literal["auto", "fp32", "bf16"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to run on: ``None`` picks CUDA when available, else the CPU.

    Raises :class:`ConfigError` for a string that is no device, CUDA asked for without CUDA, or a
    CUDA index this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a torch device (use 'cpu', 'cuda', 'cuda:1')") from exc
    if resolved.type not in ("cpu", "cuda") and not backend_available(resolved.type):  # "mps" on Linux, "meta": later crashes
        raise ConfigError(f"device={device!r}: this machine has no {resolved.type} device; use 'cpu' or 'cuda'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was requested but CUDA is not available; use device='cpu'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device={device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return resolved


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: no autocast, the model's own dtype).

    ``"bf16"``: bf16; ``"fp32"``: None; ``"auto"``: bf16 on a GPU that computes in bf16 natively
    (Ampere and later), else None (a GPU that only emulates bf16, e.g. a T4 or V100, and the CPU).
    Raises :class:`ConfigError` for any other ``precision``.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32" or device.type != "cuda":
        return None
    return torch.bfloat16 if cuda_bf16(device, native=True) else None


def cuda_bf16(device: torch.device, native: bool = False) -> bool:
    """Whether the CUDA GPU ``device`` computes in bf16 (``native``: in hardware, Ampere and later;
    else emulated counts too). ``torch.cuda.is_bf16_supported`` asks the current GPU, which on a
    machine mixing GPU generations need not be ``device``; it is asked with ``device`` current."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=not native))
        except TypeError:  # torch releases before the argument: no emulation counted
            return bool(torch.cuda.is_bf16_supported())


def precision_in_use(device: str | torch.device | None, precision: Precision) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` computes in on ``device`` (``"auto"`` resolved), for records."""
    return "bf16" if autocast_dtype(resolve_device(device), precision) is not None else "fp32"


def inference_context(device: torch.device, precision: Precision, model: torch.nn.Module | None = None) -> ExitStack:
    """Numerics and kernels of a forward pass of ``model`` over cells of varying length on ``device``.

    * ``precision``: ``"bf16"`` runs under bf16 autocast, ``"fp32"`` without, ``"auto"`` bf16 on
      a CUDA GPU with native bf16 and fp32 elsewhere (:func:`autocast_dtype`); ``"fp32"`` with a
      model held in half precision is a :class:`ConfigError` (it would compute in half precision);
    * on CUDA, SDPA may use the flash, memory-efficient and math kernels but not cuDNN's: cuDNN
      attention builds an execution graph per input shape, and dynamic padding gives nearly
      every batch a new shape, so each batch would pay for a graph build.
    """
    dtype = autocast_dtype(device, precision)
    weights = next(model.parameters()).dtype if model is not None else torch.float32
    if precision == "fp32" and weights != torch.float32:
        raise ConfigError(
            f"precision='fp32', but the model's weights are {weights}: it would compute in {weights}. "
            "Convert it first (model.float()), or ask for precision='auto' or 'bf16'"
        )
    stack = ExitStack()
    if dtype is not None:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    if device.type == "cuda":
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        stack.enter_context(sdpa_kernel(backends))
    return stack
