"""Data parallelism and activation checkpointing, applied to an unchanged Grok1 from outside.

Order as in torchtitan's parallelize(): activation checkpointing per layer, torch.compile per
layer (optional), then FSDP2
(`fully_shard` on every decoder layer, then the root). The master weights stay f32 and are
gathered as f32: the model's own forward casts to bf16 exactly where the reference does (and
keeps the router and norms f32), so FSDP's MixedPrecisionPolicy would change the numerics.
`apply_ddp` is the fallback for process groups where FSDP2 cannot run.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from grok1.model import Grok1


def apply_activation_checkpointing(model: Grok1) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    Non-reentrant checkpointing, so tensors taken from inside the layer (the router logits the
    auxiliary loss uses) still carry gradients. Parameter names are unchanged.
    """
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, type(layer).forward.__get__(layer),
                                          use_reentrant=False, preserve_rng_state=False)


def apply_compile(model: Grok1, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place (nn.Module.compile: the parameter names and
    the checkpointed forward stay). Per layer, as torchtitan: the layers share one compiled
    graph, and FSDP2's hooks between them stay outside it."""
    for layer in model.layers:
        layer.compile(backend=backend)


def apply_fsdp(model: Grok1, device_type: str, reshard_after_forward: bool = True) -> None:
    """Shard every parameter over all ranks with FSDP2: one unit per decoder layer, then the
    root (embedding, final norm). The last layer is not resharded after forward, since backward
    needs it at once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward and i < last)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Replicated data parallelism; returns the wrapper (the trainer unwraps with `.module`)."""
    from torch.nn.parallel import DistributedDataParallel

    # Every parameter gets a gradient each step, experts included: each expert matrix is one
    # [E, ...] tensor indexed per expert, so find_unused_parameters is not needed.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)
