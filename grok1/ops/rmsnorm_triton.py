"""Triton kernel of grok1.ops.rmsnorm: one program per row, the whole row in registers."""

import triton
import triton.language as tl


@triton.jit
def rmsnorm_kernel(a_ptr, h_ptr, w_a_ptr, w_next_ptr, h_out_ptr, x_out_ptr, M, D, eps,
                   FUSED: tl.constexpr, BLOCK: tl.constexpr, S: tl.constexpr = 1,
                   A: tl.constexpr = 1):
    """FUSED: h' = bf16(h + bf16(norm(a) * w_a)), x = bf16(norm(h') * w_next).
    Else: x = bf16(norm(a) * w_a) (h, w_next, h_out unused).
    a: [M, D] bf16, or partial sums [S, M, A, D] (any float dtype) summed in f32 over S and A
    and rounded to bf16 first (a split-K matmul's pieces, or the MoE's slots)."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK)
    ok = d < D
    a = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(S):
        for j in tl.static_range(A):
            a += tl.load(a_ptr + ((s * M + row) * A + j) * D + d, mask=ok, other=0.0).to(tl.float32)
    a = a.to(tl.bfloat16).to(tl.float32)
    w_a = tl.load(w_a_ptr + d, mask=ok, other=0.0).to(tl.float32)
    y = (w_a * (a * tl.rsqrt(tl.sum(a * a, 0) / D + eps))).to(tl.bfloat16)
    if FUSED:
        h = tl.load(h_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
        h_new = (h + y.to(tl.float32)).to(tl.bfloat16)
        tl.store(h_out_ptr + row * D + d, h_new, mask=ok)
        hf = h_new.to(tl.float32)
        w_n = tl.load(w_next_ptr + d, mask=ok, other=0.0).to(tl.float32)
        x = (w_n * (hf * tl.rsqrt(tl.sum(hf * hf, 0) / D + eps))).to(tl.bfloat16)
        tl.store(x_out_ptr + row * D + d, x, mask=ok)
    else:
        tl.store(x_out_ptr + row * D + d, y, mask=ok)
