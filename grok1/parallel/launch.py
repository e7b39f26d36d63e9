"""What the ranks of one torchrun job must agree on beyond the weights (grok1 generate|serve).

    torchrun --nproc-per-node 4 -m grok1 generate --checkpoint CKPT --tp 4 --moe tp "prompt"

Multi-node goes through torchrun's rendezvous (same command on every node):
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
        --nproc-per-node 4 -m grok1 generate ... --tp 8
Each rank joins through parallel.mesh.init_distributed and loads its slices through
grok1.load(..., mesh=mesh); bench/parallel_check.py checks the ranks against one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from grok1.parallel.mesh import Mesh


def agree_seed(seed: int | None, mesh: Mesh | None) -> int:
    """The same sampling seed on every rank (rank 0's), so every rank picks the same tokens."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if mesh is None or mesh.world_size == 1:
        return seed
    t = torch.tensor([seed], dtype=torch.long, device=mesh.device)
    dist.broadcast(t, src=0)
    return int(t.item())
