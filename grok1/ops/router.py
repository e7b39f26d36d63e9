"""The MoE router for decode: logits, softmax and top-k in two launches instead of about six
(the f32 cast, cuBLAS's GEMV and its reduction, softmax, top-k's gather and sort).

Twin: `grok1.model.route` (f32 logits x @ router, softmax over all experts, top-k of the
probabilities, no renormalisation; SPEC 2.6). The kernel sums the f32 products in another order
(f32 noise; a near-tie between two experts could rank them differently) and breaks exact ties
toward the lower expert id. Shape letters: M tokens, D emb_size, E experts, A selected.
"""

from __future__ import annotations

import torch

from grok1.model import route
from grok1.ops._triton import cdiv, next_pow2, use_kernel

MAX_KERNEL_ROWS = 64  # past this the GEMM of the twin (cuBLAS) is the faster router
SPLIT_K = 48          # programs per row: the router's D x E f32 matrix read by many SMs at once


def route_op(x_MD: torch.Tensor, router_DE: torch.Tensor, top_k: int, softcap: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [M, E] f32, gates [M, A] f32, expert ids [M, A] int64), as model.route
    (`softcap`: Grok-2's cap of the logits, 0 = none)."""
    M, D = x_MD.shape
    E = router_DE.shape[1]
    if not use_kernel(x_MD) or M > MAX_KERNEL_ROWS or torch.is_grad_enabled() and (
            x_MD.requires_grad or router_DE.requires_grad):
        return route(x_MD, router_DE, top_k, softcap)
    from grok1.ops.router_triton import router_logits_kernel, router_topk_kernel
    e_pad = next_pow2(E, at_least=2)
    split = max(1, min(SPLIT_K, D // 64))
    k_per_split = cdiv(D, split)
    part = torch.empty(split, M, e_pad, dtype=torch.float32, device=x_MD.device)
    router_logits_kernel[(M, split)](x_MD.contiguous(), router_DE.contiguous(), part, M, D, E,
                                     k_per_split, E_PAD=e_pad, BK=64, num_warps=2)
    logits = torch.empty(M, E, dtype=torch.float32, device=x_MD.device)
    gates = torch.empty(M, top_k, dtype=torch.float32, device=x_MD.device)
    ids = torch.empty(M, top_k, dtype=torch.int64, device=x_MD.device)
    router_topk_kernel[(M,)](part, logits, gates, ids, M, E, SPLIT=split, E_PAD=e_pad, A=top_k,
                             CAP=float(softcap), num_warps=1)
    return logits, gates, ids
