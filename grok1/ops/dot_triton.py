"""Triton helpers shared by the kernels (imported only by the *_triton.py files)."""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Triton's CPU interpreter (TRITON_INTERPRET=1, for tests) has no libdevice
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def tanh(x):
    """f32 tanh as torch's CUDA kernels compute it (libdevice's tanhf)."""
    if INTERPRETED:
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return libdevice.tanh(x)


@triton.jit
def erf(x):
    """f32 erf as torch's CUDA kernels compute it (libdevice's erff)."""
    if INTERPRETED:
        return tl.math.erf(x)
    return libdevice.erf(x)


@triton.jit
def exp(x):
    """f32 exp as torch's CUDA kernels compute it (libdevice's expf, not the fast ex2 path)."""
    if INTERPRETED:
        return tl.exp(x)
    return libdevice.exp(x)


@triton.jit
def div(a, b):
    """a / b correctly rounded, as CUDA's default division (Triton's `/` is approximate)."""
    if INTERPRETED:
        return a / b
    return tl.math.div_rn(a, b)


@triton.jit
def dot(a, b, acc, F32: tl.constexpr):
    """acc + a @ b on the tensor cores; F32 upcasts first, for Triton's CPU interpreter, which
    multiplies bf16 raw bits."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def i8_to_f32(w, MAGIC: tl.constexpr):
    """int8 -> f32, exact. MAGIC: through the float bit pattern 2^23 + (w + 128) (integer
    and FADD work) instead of the int -> float conversion unit (a quarter-rate instruction)."""
    if MAGIC:
        u = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
        return u.to(tl.float32, bitcast=True) - 8388736.0
    return w.to(tl.float32)


@triton.jit
def round_bf16_bits(x):
    """x (f32) rounded to the nearest bf16, ties to even, kept as f32: integer work on the bits
    (add 0x7FFF plus the kept part's lowest bit, clear the low half), no conversion unit."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def scaled_int8(w, s, c):
    """w * s for int8 w, exactly, in f32: the MAGIC bit pattern 2^23 + 128 + w (no int -> float
    conversion) times s plus c = -(2^23 + 128) * s in one FMA; both terms and the result fit
    f32's 24 bits, so nothing rounds. s and c are f32, broadcastable to w's shape."""
    if INTERPRETED:  # the interpreter's fma rounds the product first
        return w.to(tl.float32) * s
    u = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True)
    return tl.fma(u, s, c)


@triton.jit
def dequant_t_bf16(w_t, s):
    """The reference's weight bf16(w * s) for a transposed int8 tile w_t [BN, BK] (the MMA
    kernels' W^T) and the f32 copies of its bf16 scales s [BN]: `scaled_int8`, then bf16."""
    return scaled_int8(w_t, s[:, None], (-8388736.0 * s)[:, None]).to(tl.bfloat16)


@triton.jit
def dequant_f32(w, s, MODE: tl.constexpr):
    """The reference's weight bf16(w * s) (SPEC 3), as f32: int8 w [BK, BN], f32 copies of the
    bf16 scales s [BN]. MODE picks the instructions, never the value (all exact, then rounded
    to nearest even once): 0 int -> float unit, f32 product, round to bf16 and back through the
    conversion unit; 1 the MAGIC int8 -> f32, f32 product, rounding on the bits; 2
    `scaled_int8`, rounding on the bits; 3 `scaled_int8`, then the conversion unit's rounding
    to bf16 and back."""
    if MODE == 0:
        return (w.to(tl.float32) * s[None, :]).to(tl.bfloat16).to(tl.float32)
    if MODE == 1:
        return round_bf16_bits(i8_to_f32(w, True) * s[None, :])
    ws = scaled_int8(w, s[None, :], (-8388736.0 * s)[None, :])
    if MODE == 2:
        return round_bf16_bits(ws)
    return ws.to(tl.bfloat16).to(tl.float32)


@triton.jit
def row0(ptr, offs, ok, PAD: tl.constexpr):
    """[PAD, len(offs)]: row 0 the values at ptr + offs (masked by ok), the others 0: one row
    as the left operand of a tensor-core product (the GEMVs' MMA paths; PAD >= 16)."""
    rows = tl.arange(0, PAD)
    return tl.load(ptr + offs[None, :] + rows[:, None] * 0, mask=(rows[:, None] == 0) & ok[None, :],
                   other=0.0)
