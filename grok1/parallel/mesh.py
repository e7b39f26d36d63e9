"""The one distributed bootstrap (serving, benchmarks, checks and training): torchrun's
environment -> a process group and a Mesh, this process's place with one named axis, "tp".

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (also across nodes, through
its rendezvous); `init_distributed` reads them, picks NCCL on CUDA (one GPU per local rank) or gloo
on CPU, and builds the mesh. Every rank of the mesh is one tensor-parallel shard: attention heads,
the unembedding's vocabulary and the MoE (by expert width or by whole experts) are split over "tp"
(grok1.load(..., mesh=mesh)); training shards the same ranks with FSDP2 (train/fsdp.py).
Without torchrun it gives a one-process Mesh and no process group.

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
    """This process's place: global rank, world size, its device and the "tp" axis (no
    device mesh for a single process started without torchrun)."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    device_mesh: DeviceMesh | None

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return None if self.device_mesh is None else self.device_mesh.get_group("tp")

    @property
    def tp_size(self) -> int:
        return 1 if self.device_mesh is None else self.device_mesh.size(0)

    @property
    def tp_rank(self) -> int:
        return 0 if self.device_mesh is None else self.device_mesh.get_local_rank("tp")

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes files and shows the progress bar."""
        return self.rank == 0


def torchrun_env() -> dict[str, str]:
    """The variables torchrun sets; ConfigError naming the missing ones when not under torchrun."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"not launched by torchrun: {', '.join(missing)} unset; run "
                          f"`torchrun --nproc-per-node N -m grok1 ...` (or set them by hand)")
    return {k: os.environ[k] for k in TORCHRUN_ENV}


def _device(device: torch.device | str | None, backend: str | None,
            local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for "cuda" (the default when there is a GPU and the backend is not
    gloo), a given cuda:N as is, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() and backend != "gloo" else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has "
                              f"{torch.cuda.device_count()} GPUs; lower --nproc-per-node")
        dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    for key, value in NO_MULTICAST_ENV.items():
        os.environ.setdefault(key, value)
    return dev


def init_distributed(tp: int | None = None, *, device: torch.device | str | None = None,
                     backend: str | None = None, timeout_s: float = 600.0) -> Mesh:
    """Join the process group torchrun describes and build the "tp" mesh over all ranks.

    Without torchrun's variables (RANK, WORLD_SIZE unset) and `tp` at most 1: a one-process
    Mesh, no process group. `tp` (the --tp option) must equal the world size when given: each
    rank is one shard. `device`: cpu, cuda (= cuda:LOCAL_RANK) or cuda:N; default cuda when
    there is a GPU, unless `backend` is gloo. Raises ConfigError when --tp > 1 outside torchrun,
    for missing torchrun variables, or a tp / GPU count that does not fit.
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ and (tp or 1) == 1:
        return Mesh(0, 1, 0, _device(device, backend, 0), None)
    env = torchrun_env()
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if tp is not None and tp != world:
        raise ConfigError(f"--tp {tp} but torchrun started {world} processes; "
                          f"use --nproc-per-node (x --nnodes) = {tp}")
    dev = _device(device, backend, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world,
                                store=_attempt_store(env, rank, world, timeout),
                                device_id=dev if dev.type == "cuda" else None)
    device_mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("tp",))
    return Mesh(rank, world, local_rank, dev, device_mesh)


def _attempt_store(env: dict[str, str], rank: int, world: int,
                   timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, under a prefix unique to this torchrun attempt.

    torchrun's agent keeps one store across `--max-restarts` restarts; without a prefix a
    restarted rank can read the previous attempt's gloo addresses and fail to connect
    ("connectFullMesh failed ... Connection refused", seen with torch 2.13).
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout,
                          wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"grok1/attempt-{attempt}", store)


def shutdown(*, barrier: bool = True) -> None:
    """Leave the process group. Free CUDA graphs that captured collectives first: processes
    holding them hung in destroy_process_group (ANCHORS.md). `barrier=False` leaves at once,
    for a run whose peers may be gone (training after a rank's failure)."""
    if dist.is_initialized():
        if barrier:
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
