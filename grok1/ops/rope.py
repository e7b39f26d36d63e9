"""RoPE on q and k plus the KV-cache write, fused: one kernel instead of ~15 small ones.

Twin: `grok1.model.apply_rope` (f32 math, rounded once to bf16) and an indexed write of the
rotated k and of v into the paged cache at each token's slot (page * PAGE + offset).
cos/sin come from `model.rope_cos_sin` once per step (f32 [M, H]), so the kernel and the twin use
identical tables. Shape letters: M tokens, N query heads, K kv heads, H head size.
"""

from __future__ import annotations

import torch

from grok1.model import PartialSums, apply_rope, summed
from grok1.ops._triton import next_pow2, use_kernel

Heads = torch.Tensor | PartialSums  # [M, heads, H] bf16, or partial sums [S, M, heads, H]


def rope_and_cache_ref(q_MNH: Heads, k_MKH: Heads, v_MKH: Heads,
                       cos_MH: torch.Tensor, sin_MH: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slots_M: torch.Tensor) -> torch.Tensor:
    q_MNH, k_MKH, v_MKH = summed(q_MNH), summed(k_MKH), summed(v_MKH)
    k = apply_rope(k_MKH[None], cos_MH[None], sin_MH[None])[0]  # k first, as the reference
    q = apply_rope(q_MNH[None], cos_MH[None], sin_MH[None])[0]
    K, H = k.shape[1:]
    k_cache.view(-1, K, H)[slots_M] = k
    v_cache.view(-1, K, H)[slots_M] = v_MKH
    return q


def rope_and_cache(q_MNH: Heads, k_MKH: Heads, v_MKH: Heads,
                   cos_MH: torch.Tensor, sin_MH: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slots_M: torch.Tensor) -> torch.Tensor:
    """Rotated q [M, N, H] bf16; rotated k and v written to the caches [P, PAGE, K, H].
    q/k/v are [M, heads, H] bf16, or PartialSums [S, M, heads, H] over S (the K splits of a
    projection, grok1.ops.linear.project_many), summed and rounded to bf16 here first."""
    if not use_kernel(cos_MH):
        return rope_and_cache_ref(q_MNH, k_MKH, v_MKH, cos_MH, sin_MH, k_cache, v_cache, slots_M)
    from grok1.ops.rope_triton import rope_cache_kernel
    q4, k4, v4 = (t.terms if isinstance(t, PartialSums) else t[None]
                  for t in (q_MNH, k_MKH, v_MKH))
    if any(isinstance(t, PartialSums) and t.sum_dims != (0,) for t in (q_MNH, k_MKH, v_MKH)):
        raise ValueError("rope_and_cache: partial sums must be summed over their first dim only")
    if not (q4.shape[0] == k4.shape[0] == v4.shape[0]) or \
            any(t.stride(-1) != 1 for t in (q4, k4, v4)):
        raise ValueError("rope_and_cache: q, k, v need the same number of partial sums and "
                         "contiguous heads")
    S, M, N, H = q4.shape
    K = k4.shape[2]
    q_out = torch.empty(M, N, H, dtype=torch.bfloat16, device=q4.device)
    hp = next_pow2(H, at_least=16)
    rope_cache_kernel[(M, N + K)](
        q4, k4, v4, cos_MH.contiguous(), sin_MH.contiguous(), q_out, k_cache, v_cache,
        slots_M, *q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3], N=N, K=K, H=H,
        H_PAD=hp, S=S, num_warps=1)
    return q_out
