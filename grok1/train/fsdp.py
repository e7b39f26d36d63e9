"""Data parallelism and activation checkpointing, applied to an unchanged Grok1 from outside.

Order as in torchtitan's parallelize(): activation checkpointing per layer, then FSDP2
(`fully_shard` on every decoder layer, then the root). The master weights stay f32 and are
gathered as f32: the model's own forward casts to bf16 exactly where the reference does (and
keeps the router and norms f32), so FSDP's MixedPrecisionPolicy would change the numerics.
`apply_ddp` is the fallback for process groups where FSDP2 cannot run.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from grok1.model import Grok1


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/...; nccl on CUDA, else gloo);
    a plain single process when WORLD_SIZE is unset or 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world_size,
                                store=_attempt_store(rank, world_size, timeout),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, dev)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, under a prefix unique to this torchrun attempt.

    torchrun's agent keeps one store across `--max-restarts` restarts; without a prefix a
    restarted rank can read the previous attempt's gloo addresses and fail to connect
    ("connectFullMesh failed ... Connection refused", seen with torch 2.13).
    """
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set; "
                           f"launch with torchrun")
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout,
                          wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"grok1/attempt-{attempt}", store)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model: Grok1) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    Non-reentrant checkpointing, so tensors taken from inside the layer (the router logits the
    auxiliary loss uses) still carry gradients. Parameter names are unchanged.
    """
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, type(layer).forward.__get__(layer),
                                          use_reentrant=False, preserve_rng_state=False)


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
