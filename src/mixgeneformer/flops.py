"""Model FLOPs of a training pass and the device peaks that turn them into MFU (model FLOPs
utilisation): what the pretraining Trainer logs as ``mfu`` and the benchmarks report.

Pure arithmetic on shapes and parameter counts; the device is only asked for its name.
"""

from __future__ import annotations

import re

import torch

# Dense bf16 peak FLOP/s used for MFU. H100/H200: the project's convention (790 TFLOP/s, below
# the 989 of the SXM datasheet, so MFU is not flattered); others from vendor datasheets.
PEAK_BF16_FLOPS = {"H200": 790e12, "H100": 790e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def device_peak_flops(device: torch.device | str | None = None, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the device (None where unknown, e.g. CPUs)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None  # a CPU run on a GPU host has no GPU peak
    name = torch.cuda.get_device_name(device if device is not None and str(device) != "cpu" else None)
    for key, flops in PEAK_BF16_FLOPS.items():
        if re.search(rf"{key}(?!\d)", name):  # "L4" is not the L40's peak, "A100" not the RTX A1000's
            return flops
    return None


def count_flop_parameters(model: torch.nn.Module) -> int:
    """Parameters of the encoder layers, which every token passes through: the ``N`` of ``6 N T``.

    Left out: the embeddings (lookups); the MLM head, which runs at the masked positions only (its
    decoder is counted per masked token in :func:`training_flops`; its ``H x H`` transform there
    is under 1% of a step; its bias is an addition, not a matmul); the pooler, which sees one
    position per cell and is frozen unless a loss uses it.
    """
    return sum(param.numel() for name, param in model.named_parameters() if "encoder.layer." in name)


def training_flops(
    n_params: int,
    n_layers: int,
    hidden: int,
    batch: int,
    seq_len: int,
    n_views: int = 1,
    vocab_size: int = 0,
    n_predicted: int = 0,
) -> float:
    """Model FLOPs of one training pass (forward + backward) over a padded batch.

    ``n_views * (6 N T + 12 L H S T) + 6 V H P``, with ``T = batch * seq_len`` tokens (padded:
    the hardware computes them), ``N`` the non-embedding parameters
    (:func:`count_flop_parameters`), ``L`` layers, ``H`` hidden size, ``S`` the sequence length,
    ``V`` the vocabulary and ``P`` the positions whose MLM logits are computed. ``6 N T`` is the
    dense matmuls (2 forward + 4 backward FLOPs per parameter and token); ``12 L H S T`` the
    attention scores and weighted sums (``2 * 2 * S * H`` per token and layer forward, x3 with
    backward); ``6 V H P`` the decoder over the vocabulary. SimCSE encodes each batch twice
    (``n_views=2``). MFU = FLOPs / step time / peak FLOP/s of the device (dense bf16).
    """
    tokens = float(batch) * float(seq_len)
    encoder = n_views * (6.0 * n_params * tokens + 12.0 * n_layers * hidden * seq_len * tokens)
    return encoder + 6.0 * vocab_size * hidden * float(n_predicted)
