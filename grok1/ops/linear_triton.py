"""Triton kernel of grok1.ops.linear: x [M, K] @ W [K, N] with W int8 (+ bf16 scales [G, N])
dequantized per K tile (bf16(w * s), exactly quant.dequantize) or bf16; f32 accumulation,
optionally split along K (partials [SPLIT, M, N] f32, summed by the caller). Computed as
W^T x^T so the dequantized tile is the left operand and a small M is the narrow side."""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    if F32:  # Triton's CPU interpreter multiplies bf16 raw bits: upcast there only
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def linear_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, GROUP_K, NUM_GROUPS, K_PER_SPLIT,
                  QUANT: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, EVEN_K: tl.constexpr, F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    m_ok = m < M
    n_ok = n < N
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, BK):
        kk = k0 + tl.arange(0, BK)
        if EVEN_K:
            x_t = tl.load(x_ptr + m[None, :].to(tl.int64) * K + kk[:, None], mask=m_ok[None, :],
                          other=0.0)
            w = tl.load(w_ptr + kk[None, :].to(tl.int64) * N + n[:, None], mask=n_ok[:, None],
                        other=0)
        else:
            x_t = tl.load(x_ptr + m[None, :].to(tl.int64) * K + kk[:, None],
                          mask=m_ok[None, :] & (kk[:, None] < K), other=0.0)
            w = tl.load(w_ptr + kk[None, :].to(tl.int64) * N + n[:, None],
                        mask=n_ok[:, None] & (kk[None, :] < K), other=0)
        if QUANT:
            grp = tl.minimum(k0 // GROUP_K, NUM_GROUPS - 1)
            s = tl.load(s_ptr + grp * N + n, mask=n_ok, other=0.0)
            w = (w.to(tl.float32) * s.to(tl.float32)[:, None]).to(tl.bfloat16)
        acc = _dot(w, x_t, acc, F32)
    ptrs = m[None, :].to(tl.int64) * N + n[:, None]
    mask = m_ok[None, :] & n_ok[:, None]
    if SPLIT == 1:
        tl.store(out_ptr + ptrs, acc.to(tl.bfloat16), mask=mask)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + ptrs, acc, mask=mask)
