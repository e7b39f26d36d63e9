"""Triton kernel of grok1.ops.rope: program (token, head); heads >= N are kv heads."""

import triton
import triton.language as tl


@triton.jit
def _head(ptr, s_stride, d, ok, S: tl.constexpr):
    """One head's row [H_PAD] in f32: the sum of its S partial sums, rounded to bf16 (the
    projection's output), or the bf16 row itself when S == 1."""
    x = tl.zeros(d.shape, dtype=tl.float32)
    for s in tl.static_range(S):
        x += tl.load(ptr + s * s_stride + d, mask=ok, other=0.0).to(tl.float32)
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr,
                      v_cache_ptr, slots_ptr, sq_s, sq_m, sq_n, sk_s, sk_m, sk_n, sv_s, sv_m, sv_n,
                      N: tl.constexpr, K: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr,
                      S: tl.constexpr):
    """q/k/v [S, M, heads, H] (strides given, heads contiguous), summed over S."""
    m = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    HALF: tl.constexpr = H // 2
    d = tl.arange(0, H_PAD)
    ok = d < H
    partner = tl.where(d < HALF, d + HALF, d - HALF)  # rotate_half: [-x2, x1]
    sign = tl.where(d < HALF, -1.0, 1.0)
    cos = tl.load(cos_ptr + m * H + d, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + m * H + d, mask=ok, other=0.0)
    if j < N:
        base = q_ptr + m * sq_m + j * sq_n
        x = _head(base, sq_s, d, ok, S)
        xr = _head(base, sq_s, partner, ok, S)
        y = x * cos + sign * xr * sin
        tl.store(q_out_ptr + (m * N + j) * H + d, y.to(tl.bfloat16), mask=ok)
    else:
        kh = j - N
        slot = tl.load(slots_ptr + m).to(tl.int64)
        base = k_ptr + m * sk_m + kh * sk_n
        x = _head(base, sk_s, d, ok, S)
        xr = _head(base, sk_s, partner, ok, S)
        y = x * cos + sign * xr * sin
        tl.store(k_cache_ptr + (slot * K + kh) * H + d, y.to(tl.bfloat16), mask=ok)
        v = _head(v_ptr + m * sv_m + kh * sv_n, sv_s, d, ok, S)
        tl.store(v_cache_ptr + (slot * K + kh) * H + d, v.to(tl.bfloat16), mask=ok)
