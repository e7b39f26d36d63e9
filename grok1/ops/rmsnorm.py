"""RMSNorm, and the sandwich-norm residual step fused with the next norm.

Twin: `grok1.model.rms_norm` (f32 math, bf16 out). `add_rms_norm(h, a, w_a, w_next)` is
h' = h + rms_norm(summed(a), w_a) (a bf16 add, as the reference's residual), x = rms_norm(h', w_next):
one pass over the rows instead of about a dozen elementwise kernels.
Shape letters: M rows, D emb_size.
"""

from __future__ import annotations

import torch

from grok1.model import RMS_EPS, PartialSums, rms_norm, summed
from grok1.ops._triton import next_pow2, use_kernel


def add_rms_norm_ref(h_MD: torch.Tensor, a: torch.Tensor | PartialSums, w_a_D: torch.Tensor,
                     w_next_D: torch.Tensor, eps: float = RMS_EPS
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    h = h_MD + rms_norm(summed(a).reshape(h_MD.shape), w_a_D, eps)
    return h, rms_norm(h, w_next_D, eps)


def terms_SMAD(a: PartialSums) -> torch.Tensor:
    """The kernel's view of partial sums: [S, M, A, D] summed over S and A."""
    if a.sum_dims == (0, 2) and a.terms.dim() == 4:
        return a.terms
    if a.sum_dims == (0,) and a.terms.dim() == 3:
        return a.terms[:, :, None]
    raise ValueError(f"add_rms_norm: partial sums {tuple(a.terms.shape)} over {a.sum_dims}: "
                     "expected [S, M, D] over (0,) or [S, M, A, D] over (0, 2)")


def rms_norm_op(x_MD: torch.Tensor, w_D: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    if not use_kernel(x_MD):
        return rms_norm(x_MD, w_D, eps)
    from grok1.ops.rmsnorm_triton import rmsnorm_kernel
    x = x_MD.contiguous()
    M, D = x.shape
    out = torch.empty_like(x)
    rmsnorm_kernel[(M,)](x, x, w_D, w_D, out, out, M, D, eps, FUSED=False,
                         BLOCK=triton_block(D), num_warps=8)
    return out


def add_rms_norm(h_MD: torch.Tensor, a: torch.Tensor | PartialSums, w_a_D: torch.Tensor,
                 w_next_D: torch.Tensor, eps: float = RMS_EPS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + rms_norm(summed(a), w_a), rms_norm of that with w_next), both bf16 [M, D]; `a` is
    [M, D] (bf16, or f32 rounded here) or PartialSums, summed in the kernel. `eps`: both
    norms' (one model's norms share the config's)."""
    if not use_kernel(h_MD):
        return add_rms_norm_ref(h_MD, a, w_a_D, w_next_D, eps)
    from grok1.ops.rmsnorm_triton import rmsnorm_kernel
    h = h_MD.contiguous()
    M, D = h.shape
    if isinstance(a, PartialSums):
        a = terms_SMAD(a).contiguous()
        S, A = a.shape[0], a.shape[2]
    else:
        a, S, A = a.contiguous(), 1, 1
    h_out, x_out = torch.empty_like(h), torch.empty_like(h)
    rmsnorm_kernel[(M,)](a, h, w_a_D, w_next_D, h_out, x_out, M, D, eps, FUSED=True,
                         BLOCK=triton_block(D), S=S, A=A, num_warps=8)
    return h_out, x_out


def triton_block(D: int) -> int:
    return next_pow2(D, at_least=16)
