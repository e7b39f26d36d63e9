"""Triton helpers shared by the kernels (imported only by the *_triton.py files)."""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, F32: tl.constexpr):
    """acc + a @ b on the tensor cores; F32 upcasts first, for Triton's CPU interpreter, which
    multiplies bf16 raw bits."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)
