"""Triton kernel of grok1.ops.rope: program (token, head); heads >= N are kv heads."""

import triton
import triton.language as tl


@triton.jit
def rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr,
                      v_cache_ptr, slots_ptr, sq_m, sq_n, sk_m, sk_n, sv_m, sv_n,
                      N: tl.constexpr, K: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr):
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
        x = tl.load(base + d, mask=ok, other=0.0).to(tl.float32)
        xr = tl.load(base + partner, mask=ok, other=0.0).to(tl.float32)
        y = x * cos + sign * xr * sin
        tl.store(q_out_ptr + (m * N + j) * H + d, y.to(tl.bfloat16), mask=ok)
    else:
        kh = j - N
        slot = tl.load(slots_ptr + m).to(tl.int64)
        base = k_ptr + m * sk_m + kh * sk_n
        x = tl.load(base + d, mask=ok, other=0.0).to(tl.float32)
        xr = tl.load(base + partner, mask=ok, other=0.0).to(tl.float32)
        y = x * cos + sign * xr * sin
        tl.store(k_cache_ptr + (slot * K + kh) * H + d, y.to(tl.bfloat16), mask=ok)
        v = tl.load(v_ptr + m * sv_m + kh * sv_n + d, mask=ok)
        tl.store(v_cache_ptr + (slot * K + kh) * H + d, v, mask=ok)
