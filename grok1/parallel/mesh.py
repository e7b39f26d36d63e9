"""torchrun's environment -> a process group and a DeviceMesh with one named axis, "tp".

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (also across nodes, through
its rendezvous); `init_distributed` reads them, picks NCCL on CUDA (one GPU per local rank) or gloo
on CPU, and builds the mesh. Every rank of the mesh is one tensor-parallel shard: attention heads,
the unembedding's vocabulary and the MoE (by expert width or by whole experts) are split over "tp".

    torchrun --nproc-per-node 4 -m grok1 generate ... --tp 4 --moe tp
    # two nodes: on each, torchrun --nnodes 2 --node-rank R --rdzv-backend c10d \
    #     --rdzv-endpoint HOST0:29500 --nproc-per-node 4 -m grok1 ... --tp 8
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from grok1.config import ConfigError

# NVLink multicast (NVLS) hangs or fails on the lent machines (ANCHORS.md, communication): keep
# it off in NCCL, torch symmetric memory and NVSHMEM. Set before the first NCCL communicator.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class Mesh:
    """This process's place: global rank, world size, its device and the "tp" axis."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    device_mesh: DeviceMesh

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("tp")

    @property
    def tp_size(self) -> int:
        return self.device_mesh.size(0)

    @property
    def tp_rank(self) -> int:
        return self.device_mesh.get_local_rank("tp")

    @property
    def is_first(self) -> bool:
        """Rank 0 prints, writes files and shows the progress bar."""
        return self.rank == 0


def torchrun_env() -> dict[str, str]:
    """The variables torchrun sets; ConfigError naming the missing ones when not under torchrun."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"not launched by torchrun: {', '.join(missing)} unset; run "
                          f"`torchrun --nproc-per-node N -m grok1 ...` (or set them by hand)")
    return {k: os.environ[k] for k in TORCHRUN_ENV}


def init_distributed(tp: int | None = None, *, backend: str | None = None,
                     timeout_s: float = 600.0) -> Mesh:
    """Join the process group torchrun describes and build the "tp" mesh over all ranks.

    `tp` (the --tp option) must equal the world size when given: each rank is one shard.
    Raises ConfigError when not under torchrun, or for a tp / GPU count that does not fit.
    """
    env = torchrun_env()
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if tp is not None and tp != world:
        raise ConfigError(f"--tp {tp} but torchrun started {world} processes; "
                          f"use --nproc-per-node (x --nnodes) = {tp}")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has "
                              f"{torch.cuda.device_count()} GPUs; lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        for key, value in NO_MULTICAST_ENV.items():
            os.environ.setdefault(key, value)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    device_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
    return Mesh(rank, world, local_rank, device, device_mesh)


def shutdown() -> None:
    """Leave the process group. Free CUDA graphs that captured collectives first: processes
    holding them hung in destroy_process_group (ANCHORS.md)."""
    if dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        dist.destroy_process_group()


# ---- collectives used by the parallel model (in place, so CUDA graphs can capture them) --------

def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum t over the group in place and return it (a no-op for one rank or no group)."""
    if group_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def all_gather_last(t_local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's t [..., n] concatenated along the last dim in rank order -> [..., R*n]."""
    R = group_size(group)
    if R == 1:
        return t_local
    out = torch.empty(R * t_local.numel(), dtype=t_local.dtype, device=t_local.device)
    _all_gather_flat(out, t_local.reshape(-1), group=group)  # 1-D: gloo and NCCL both take it
    out = out.view(R, *t_local.shape)
    return out.movedim(0, -2).reshape(*t_local.shape[:-1], R * t_local.shape[-1])


def _all_gather_flat(out: torch.Tensor, t: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # all_gather_single replaces all_gather_into_tensor in newer torch; older ones lack it
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t.contiguous(), group=group)
