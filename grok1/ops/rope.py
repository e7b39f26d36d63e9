"""RoPE on q and k plus the KV-cache write, fused: one kernel instead of ~15 small ones.

Twin: `grok1.model.apply_rope` (f32 math, rounded once to bf16) and an indexed write of the
rotated k and of v into the paged cache at each token's slot (page * PAGE + offset).
cos/sin come from `model.rope_cos_sin` once per step (f32 [M, H]), so the kernel and the twin use
identical tables. Shape letters: M tokens, N query heads, K kv heads, H head size.
"""

from __future__ import annotations

import torch

from grok1.model import apply_rope
from grok1.ops._triton import use_kernel


def rope_and_cache_ref(q_MNH: torch.Tensor, k_MKH: torch.Tensor, v_MKH: torch.Tensor,
                       cos_MH: torch.Tensor, sin_MH: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slots_M: torch.Tensor) -> torch.Tensor:
    k = apply_rope(k_MKH[None], cos_MH[None], sin_MH[None])[0]  # k first, as the reference
    q = apply_rope(q_MNH[None], cos_MH[None], sin_MH[None])[0]
    K, H = k.shape[1:]
    k_cache.view(-1, K, H)[slots_M] = k
    v_cache.view(-1, K, H)[slots_M] = v_MKH
    return q


def rope_and_cache(q_MNH: torch.Tensor, k_MKH: torch.Tensor, v_MKH: torch.Tensor,
                   cos_MH: torch.Tensor, sin_MH: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slots_M: torch.Tensor) -> torch.Tensor:
    """Rotated q [M, N, H]; rotated k and v written to the caches [P, PAGE, K, H]."""
    if not use_kernel(q_MNH):
        return rope_and_cache_ref(q_MNH, k_MKH, v_MKH, cos_MH, sin_MH, k_cache, v_cache, slots_M)
    from grok1.ops.rope_triton import rope_cache_kernel
    M, N, H = q_MNH.shape
    K = k_MKH.shape[1]
    q_out = torch.empty(M, N, H, dtype=q_MNH.dtype, device=q_MNH.device)
    hp = max(16, 1 << (H - 1).bit_length())
    rope_cache_kernel[(M, N + K)](
        q_MNH, k_MKH, v_MKH, cos_MH.contiguous(), sin_MH.contiguous(), q_out, k_cache, v_cache,
        slots_M, q_MNH.stride(0), q_MNH.stride(1), k_MKH.stride(0), k_MKH.stride(1),
        v_MKH.stride(0), v_MKH.stride(1), N=N, K=K, H=H, H_PAD=hp, num_warps=1)
    return q_out
