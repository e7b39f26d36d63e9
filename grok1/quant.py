"""Int8 weights with bf16 scales, as in the release checkpoint (SPEC section 3).

A quantized matrix W [..., K, N] (K the input dim) is stored as int8 `weight` [..., K, N] and bf16
`scales` [..., G, N]: one scale per output column for each of G equal blocks of the input dim.
G is 8 where the reference shards the input dim 8 ways (attention output, expert down
projection), else 1. Dequantization rounds to bf16 once: W = bf16(weight * scale).
"""

from __future__ import annotations

import torch

# Scale groups along the input dim of each quantized matrix, by model.py's module name (SPEC 3).
QUANT_GROUPS: dict[str, int] = {
    "attn.wq": 1, "attn.wk": 1, "attn.wv": 1, "attn.wo": 8,
    "moe.w_gate": 1, "moe.w_up": 1, "moe.w_down": 8,
}


def dequantize(weight_KN: torch.Tensor, scales_GN: torch.Tensor) -> torch.Tensor:
    """bf16 [..., K, N] from int8 [..., K, N] and bf16 scales [..., G, N] (G divides K).

    int8 -> bf16 is exact (|w| <= 127), and a bf16 x bf16 product is computed exactly and
    rounded once, which is the reference's bf16(w * s).
    """
    *lead, K, N = weight_KN.shape
    G = scales_GN.shape[-2]
    w = weight_KN.reshape(*lead, G, K // G, N).to(torch.bfloat16)
    return (w * scales_GN.unsqueeze(-2)).reshape(*lead, K, N)


def quantize(w_KN: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 with bf16 scales per output column and input-dim group.

    Returns (int8 [..., K, N], bf16 [..., G, N]); used to write checkpoints and to build
    random benchmark weights, never on the inference path.
    """
    *lead, K, N = w_KN.shape
    if K % groups:
        raise ValueError(f"input dim {K} is not divisible into {groups} scale groups")
    w = w_KN.float().reshape(*lead, groups, K // groups, N)
    scales = (w.abs().amax(dim=-2) / 127.0).clamp_min(1e-12).to(torch.bfloat16)
    q = torch.round(w / scales.float().unsqueeze(-2)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(*lead, K, N), scales
