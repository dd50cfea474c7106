"""FSDP2 (Accelerate's ``fsdp_version`` 2, torch's ``fully_shard``) for the tied BERT-MLM model.

Two things Accelerate's FSDP2 path gets wrong for this model, fixed here without touching the
checkpoint layout (``BertForMaskedLM``'s keys, the decoder tied to the word embeddings):

* **Groups.** Accelerate shards the tied word embeddings and the MLM decoder as one group and leaves
  the rest of the head in the root group; the decoder's bias *is* ``cls.predictions.bias``, so that
  parameter sits in two groups, which torch >= 2.13 refuses at the first forward.
  :func:`shard_model` shards the model before Accelerate prepares it, as Accelerate would, but with the
  word embeddings and the whole MLM head (``cls``) as ONE group; Accelerate then leaves it as it is.
* **Gathered weights.** Gathered under FSDP2 (on rank 0), the tied tensors are separate copies:
  :func:`checkpoint_state_dict` leaves the decoder's copies out of a checkpoint's
  ``model.safetensors`` (the layout a DDP run writes), and :func:`model_from_gathered` rebuilds the
  model of the final bundle from them. Both refuse a state dict that still holds shards (DTensors).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from .errors import ArtifactError, ConfigError
from .model import MixGeneformerForPretraining

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

__all__ = ["check_unsharded", "checkpoint_state_dict", "is_fsdp2", "model_from_gathered", "shard_model", "tied_head_modules"]


def is_fsdp2(accelerator: Accelerator) -> bool:
    """Accelerate runs FSDP2 (``fully_shard``) for this job."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def tied_head_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose parameters are tied to each other: the input word embeddings and the MLM head
    (``cls``: its decoder's weight is the embeddings', its decoder's bias ``cls.predictions.bias``).
    The embeddings first: their forward comes first, and the group is gathered there."""
    return [model.get_input_embeddings(), model.cls]


def shard_model(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Shard ``model`` with FSDP2 as Accelerate's ``fsdp2_prepare_model`` would (one group per
    ``fsdp_wrap_layer`` block, its mesh, mixed-precision and offload settings, then the root), except
    that :func:`tied_head_modules` are ONE group (kept gathered from the embeddings' forward to the
    head's, like Accelerate's tied-embedding group). Accelerate then finds an FSDP module and leaves
    it as it is. Call it before the optimizer is built on the model's parameters (Accelerate maps
    the optimizer's parameters to the sharded ones by storage). Returns whether it sharded (False:
    not FSDP2, or sharded already)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.other import get_module_children_bottom_up
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not is_fsdp2(accelerator) or isinstance(model, FSDPModule):
        return False
    plugin = accelerator.state.fsdp_plugin
    if plugin.cpu_ram_efficient_loading or plugin.activation_checkpointing or plugin.ignored_modules is not None:
        raise ConfigError("FSDP2 here shards the model itself (the tied MLM head in one group); fsdp_config "
                         "cpu_ram_efficient_loading, activation_checkpointing and ignored_modules are not supported.")
    mesh = getattr(accelerator, "torch_device_mesh", None)
    precision = plugin.mixed_precision_policy or MixedPrecisionPolicy()
    kwargs = {
        "offload_policy": plugin.cpu_offload,
        "mp_policy": precision,
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    tied = tied_head_modules(model)
    inside_tied = {id(m) for head in tied for m in head.modules()}
    for module in get_module_children_bottom_up(model)[:-1] if policy is not None else []:
        if id(module) not in inside_tied and policy(module) and not isinstance(module, FSDPModule):
            fully_shard(module, reshard_after_forward=plugin.reshard_after_forward, **kwargs)
    fully_shard(tied, reshard_after_forward=False, **kwargs)
    # The root (torch's default: not resharded after forward) returns its outputs as computed: Accelerate's
    # bf16 / fp16 policy casts a group's outputs to that dtype, and the root's are the loss and its parts
    # (float32), which metrics.csv and the held-out loss then held in bf16 (3.8125 for 3.8140; DDP's are float32).
    fully_shard(model, **{**kwargs, "mp_policy": dataclasses.replace(precision, output_dtype=None)})
    logger.info("FSDP2: word embeddings and MLM head sharded as one group (tied parameters)")
    return True


def model_from_gathered(config: PretrainedConfig, state_dict: dict[str, torch.Tensor]) -> MixGeneformerForPretraining:
    """A fresh model holding the full weights gathered under FSDP / DeepSpeed. Every tensor must land:
    a key under another name (a wrapper's prefix) left that tensor at its random initialisation, and
    the bundle was written without a word. Only tensors tied to a loaded one (the MLM decoder) may be absent."""
    check_unsharded(state_dict)
    fresh = MixGeneformerForPretraining(config)
    result = fresh.load_state_dict(state_dict, strict=False)
    own = fresh.state_dict(keep_vars=True)
    loaded = {own[key].data_ptr() for key in state_dict if key in own}
    missing = [key for key in result.missing_keys if own[key].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"the gathered weights do not match the model: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}); the final bundle was not "
            "written. The newest checkpoint holds the trained weights."
        )
    return fresh


def check_unsharded(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a "full" state dict that still holds shards (DTensors): Accelerate gathers FSDP2 weights
    only where its state says FSDP, and a file of shards would not load anywhere."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 (pyproject allows 2.4): the same class under its former private path
        from torch.distributed._tensor import DTensor

    sharded = [key for key, value in state_dict.items() if isinstance(value, DTensor)]
    if sharded:
        raise ArtifactError(f"the gathered weights still hold {len(sharded)} FSDP shards (e.g. {sharded[:3]}) instead of "
                            "full tensors; nothing was written. Accelerate's state does not say FSDP on this rank.")


def checkpoint_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gathered state dict a checkpoint's ``model.safetensors`` holds: full tensors, without the
    copies of tied parameters (the MLM decoder's weight and bias), as a DDP run's checkpoint and
    ``BertForMaskedLM``'s layout. Gathered, the tied tensors are separate copies, which transformers
    would store twice."""
    check_unsharded(state_dict)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return {key: value for key, value in state_dict.items() if not (key in tied and tied[key] in state_dict)}
