"""Triton kernels of grok1.ops.linear: x [M, K] @ W [K, N] with W quantized (+ bf16 scales
[G, N]; the constexpr WFMT picks int8, int4 packed [K / 2, N] or fp8, grok1.ops.dot_triton)
dequantized per K tile (bf16(w * s), exactly quant.dequantize_as) or bf16; f32 accumulation,
optionally split along K (partials [SPLIT, M, N] f32, summed by the caller). Computed as
W^T x^T so the dequantized tile is the left operand and a small M is the narrow side."""

import triton
import triton.language as tl

from grok1.ops.dot_triton import (
    dequant_bf16,
    dequant_f32,
    dequant_t_bf16,
    dot,
    row0,
    to_bf16,
    w_offsets,
)


@triton.jit
def linear_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, GROUP_K, NUM_GROUPS, K_PER_SPLIT,
                  WFMT: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
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
        w_ptrs = w_ptr + w_offsets(kk[None, :].to(tl.int64), n[:, None], N, WFMT)
        if EVEN_K:
            x_t = tl.load(x_ptr + m[None, :].to(tl.int64) * K + kk[:, None], mask=m_ok[None, :],
                          other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        else:
            x_t = tl.load(x_ptr + m[None, :].to(tl.int64) * K + kk[:, None],
                          mask=m_ok[None, :] & (kk[:, None] < K), other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & (kk[None, :] < K), other=0)
        if WFMT != 0:
            grp = tl.minimum(k0 // GROUP_K, NUM_GROUPS - 1)
            s = tl.load(s_ptr + grp * N + n, mask=n_ok, other=0.0).to(tl.float32)
            w = dequant_t_bf16(w, kk, s, WFMT)
        acc = dot(w, x_t, acc, F32)
    ptrs = m[None, :].to(tl.int64) * N + n[:, None]
    mask = m_ok[None, :] & n_ok[:, None]
    if SPLIT == 1:
        tl.store(out_ptr + ptrs, to_bf16(acc), mask=mask)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + ptrs, acc, mask=mask)


@triton.jit
def gemv3_kernel(x_ptr, w0_ptr, s0_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr, out_ptr, K, N0, N1, N2,
                 T0, T1, N_TOTAL, GROUP_K, CHUNK, K_PER_SPLIT, WFMT: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                 DEQUANT: tl.constexpr, MMA: tl.constexpr, F32: tl.constexpr):
    """One row x [K] times up to three quantized matrices W_i [K, N_i] of format WFMT (bf16
    scales [G, N_i], the same G) sharing x: out[split, col] f32 partial sums over this split's
    K range, the columns of the three outputs side by side. Grid (T0 + T1 + T2 column tiles,
    SPLIT). Each weight is
    dequantized as the reference does, bf16(w * s), and its products with x accumulate in an f32
    [BK, BN] tile, reduced every CHUNK rows (a CHUNK lies in one scale group: CHUNK divides
    GROUP_K, or G == 1; BK divides CHUNK; CHUNK divides K_PER_SPLIT).
    MMA: the products on the tensor cores instead (x padded to 16 rows against the dequantized
    bf16 tile, as ops/moe_triton's moe_mma_gemv_*): the same weights and f32 sums, fewer
    instructions per weight than the FMA path's f32 round trip, which is ALU-bound."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if pid_n < T0:
        w_ptr = w0_ptr
        s_ptr = s0_ptr
        N = N0
        t = pid_n
        col0 = 0
    elif pid_n < T0 + T1:
        w_ptr = w1_ptr
        s_ptr = s1_ptr
        N = N1
        t = pid_n - T0
        col0 = N0
    else:
        w_ptr = w2_ptr
        s_ptr = s2_ptr
        N = N2
        t = pid_n - T0 - T1
        col0 = N0 + N1
    n = t * BN + tl.arange(0, BN)
    n_ok = n < N
    acc = tl.zeros([BN], dtype=tl.float32)
    acc16 = tl.zeros([16, BN], dtype=tl.float32)  # MMA: rows 1.. stay 0
    k_lo = pid_k * K_PER_SPLIT
    for c1 in range(0, K_PER_SPLIT, CHUNK):  # the last split may run past K: masked
        k1 = k_lo + c1
        grp = k1 // GROUP_K
        s = tl.load(s_ptr + grp * N + n, mask=n_ok & (k1 < K), other=0.0).to(tl.float32)
        part = tl.zeros([BK, BN], dtype=tl.float32)
        for c0 in range(0, CHUNK, BK):
            kk = k1 + c0 + tl.arange(0, BK)
            offs = w_offsets(kk[:, None], n[None, :], N, WFMT)
            k_ok = kk < K
            if EVEN_K:
                w = tl.load(w_ptr + offs, mask=n_ok[None, :], other=0)
            else:
                w = tl.load(w_ptr + offs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            # the reference's weight: bf16(w * s), rounded once (SPEC 3), times x in f32
            if MMA:
                acc16 = dot(row0(x_ptr, kk, k_ok, 16), dequant_bf16(w, kk, s, WFMT), acc16, F32)
            else:
                xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                part += dequant_f32(w, kk, s, WFMT, DEQUANT) * xk[:, None]
        if not MMA:
            acc += tl.sum(part, 0)
    if MMA:
        acc = tl.sum(acc16, 0)
    tl.store(out_ptr + pid_k.to(tl.int64) * N_TOTAL + col0 + n, acc, mask=n_ok)
