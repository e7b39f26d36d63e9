"""Triton helpers shared by the kernels (imported only by the *_triton.py files).

Weight formats: one kernel family serves every format through a constexpr WFMT (grok1.ops._triton:
0 bf16, 1 int8, 2 int4 packed two input rows per byte, 3 fp8 e4m3), read by `w_offsets`,
`stored_rows` and the dequantizers below; every quantized format gives the reference's weight
bf16(q * s), q exact in f32 and the product rounded once.
"""

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
def to_bf16(x):
    """f32 -> bf16 rounded to nearest even. The interpreter's cast truncates instead, which
    biases every rounding the same way: there the rounding is done on the bits first."""
    if INTERPRETED:
        return round_bf16_bits(x).to(tl.bfloat16)
    return x.to(tl.bfloat16)


@triton.jit
def stored_rows(K, WFMT: tl.constexpr):
    """Rows of a stored [K, N] weight: int4 packs two input rows per byte (quant.pack_int4)."""
    if WFMT == 2:
        return K // 2
    return K


@triton.jit
def w_offsets(k, n, N, WFMT: tl.constexpr):
    """Element offsets of W[k, n] in its stored [K, N] (int4: [K / 2, N], row k in byte
    k // 2; `scaled_low_bits` picks the nibble). k, n broadcast to the tile's shape."""
    if WFMT == 2:
        return (k // 2) * N + n
    return k * N + n


@triton.jit
def scaled_low_bits(w, k, s, WFMT: tl.constexpr):
    """q * s, exact in f32 (a 4-bit code or an e4m3 value times a bf16 scale), for an int4
    (WFMT 2: w the bytes loaded at rows k // 2, row k's code in the low nibble for even k, the
    high one for odd, stored as code + 8) or fp8 tile (WFMT 3: w its bytes, uint8, as
    _triton.loadable passes it); s the f32 copies of the bf16 scales, broadcast to the tile.
    Rounded once to bf16 it is the reference's weight bf16(q * s) (quant.dequantize_as)."""
    if WFMT == 2:
        q = int4_f32((w.to(tl.int32) >> ((k & 1) * 4)) & 0xF)
    else:
        q = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return q * s


@triton.jit
def int4_f32(code):
    """An int4 code (stored + 8, 0..15, int32) as f32 code - 8, exactly: through the float bit
    pattern 2^23 + code (integer work, no int -> float conversion unit)."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


# int4 codes to the reference's bf16(q * s) in packed bf16 arithmetic, four bytes a call:
# each nibble (code + 8) OR 0x4300 is the bf16 128 + code (its 7-bit mantissa holds 4 bits),
# minus 136 is q exactly, and one bf16 FMA (times s, plus -0) rounds q * s once, to nearest
# even: quant.dequantize_as's value, about 2 instructions an element where the f32 route
# (int4_f32, multiply, convert) takes 5. Bytes b0..b3 of $2 give lanes (b0, b1) of $0 and
# (b2, b3) of $1; $3, $4 the scales of the same lanes.
_INT4_ASM = """{
.reg .b32 t0, t1, one, q0, mz;
prmt.b32 t0, $2, 0, 0x4140;
prmt.b32 t1, $2, 0, 0x4342;
SHIFT
lop3.b32 t0, t0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
mov.b32 one, 0x3F803F80;
mov.b32 q0, 0xC308C308;
mov.b32 mz, 0x80008000;
fma.rn.bf16x2 t0, t0, one, q0;
fma.rn.bf16x2 t1, t1, one, q0;
fma.rn.bf16x2 $0, t0, $3, mz;
fma.rn.bf16x2 $1, t1, $4, mz;
}"""
INT4_LOW_ASM = tl.constexpr(_INT4_ASM.replace("SHIFT", ""))
INT4_HIGH_ASM = tl.constexpr(_INT4_ASM.replace("SHIFT", "shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;"))


@triton.jit
def int4_bf16(b, s, HIGH: tl.constexpr):
    """bf16(q * s) for the low (HIGH: high) nibbles of the int4 bytes b (uint8, each nibble the
    code + 8, quant.pack_int4) and the bf16 scales s (broadcast to b's shape)."""
    if INTERPRETED:
        code = (b.to(tl.int32) >> (4 if HIGH else 0)) & 0xF
        return to_bf16(int4_f32(code) * s.to(tl.float32))
    s = tl.broadcast_to(s, b.shape)
    return tl.inline_asm_elementwise(INT4_HIGH_ASM if HIGH else INT4_LOW_ASM,
                                     "=r,=r,r,r,r", [b, s], dtype=tl.bfloat16, is_pure=True,
                                     pack=4)


@triton.jit
def int4_pair_bf16(w_ptr, r, n, N, r_ok, n_ok, s, EVEN: tl.constexpr, TRANS: tl.constexpr = False):
    """The reference's weights bf16(q * s) of an int4 W [K, N] (packed [K / 2, N]) at rows 2r
    (the low nibbles) and 2r + 1 (the high ones), two [len(r), BN] tiles from one load of the
    bytes [r, n] (TRANS: the transposed tiles [BN, len(r)], the grouped GEMMs' W^T): the
    tensor-core products multiply them by x's even and odd rows (two MMAs of len(r) rows), so
    each byte is loaded once and no nibble needs a per-row shift. s [BN]: the bf16 scales (or
    their f32 copies). EVEN: no masks (r_ok, n_ok all true)."""
    if TRANS:
        offs = r[None, :] * N + n[:, None]
        ok = n_ok[:, None] & r_ok[None, :]
        s2 = s.to(tl.bfloat16)[:, None]
    else:
        offs = r[:, None] * N + n[None, :]
        ok = r_ok[:, None] & n_ok[None, :]
        s2 = s.to(tl.bfloat16)[None, :]
    if EVEN:
        b = tl.load(w_ptr + offs)
    else:
        b = tl.load(w_ptr + offs, mask=ok, other=0)
    return int4_bf16(b, s2, False), int4_bf16(b, s2, True)


@triton.jit
def dequant_t_bf16(w_t, k, s, WFMT: tl.constexpr):
    """The reference's weight bf16(w * s) for a transposed quantized tile w_t [BN, BK] (the MMA
    kernels' W^T), rows k [BK], the f32 copies of its bf16 scales s [BN]: the exact product
    (int8 through `scaled_int8`, int4 and fp8 through `scaled_low_bits`) rounded once."""
    if WFMT == 1:
        return to_bf16(scaled_int8(w_t, s[:, None], (-8388736.0 * s)[:, None]))
    return to_bf16(scaled_low_bits(w_t, k[None, :], s[:, None], WFMT))


@triton.jit
def dequant_bf16(w, k, s, WFMT: tl.constexpr):
    """`dequant_t_bf16` for a tile as stored, w [BK, BN] (the tensor-core GEMVs' right operand)."""
    if WFMT == 1:
        return to_bf16(scaled_int8(w, s[None, :], (-8388736.0 * s)[None, :]))
    return to_bf16(scaled_low_bits(w, k[:, None], s[None, :], WFMT))


@triton.jit
def dequant_f32(w, k, s, WFMT: tl.constexpr, MODE: tl.constexpr):
    """The reference's weight bf16(w * s) (SPEC 3), as f32, for a tile as stored w [BK, BN]
    (rows k [BK], for int4's nibbles) and the f32 copies of the bf16 scales s [BN] (WFMT 1-3).
    For int8, MODE picks the instructions, never the value (all exact, then rounded to nearest
    even once): 0 int -> float unit, f32 product, round to bf16 and back through the conversion
    unit; 1 the MAGIC int8 -> f32, f32 product, rounding on the bits; 2 `scaled_int8`, rounding
    on the bits; 3 `scaled_int8`, then the conversion unit's rounding to bf16 and back. int4
    and fp8 have one way (`scaled_low_bits`, rounding on the bits)."""
    if WFMT != 1:
        return round_bf16_bits(scaled_low_bits(w, k[:, None], s[None, :], WFMT))
    if MODE == 0:
        return to_bf16(w.to(tl.float32) * s[None, :]).to(tl.float32)
    if MODE == 1:
        return round_bf16_bits(i8_to_f32(w, True) * s[None, :])
    ws = scaled_int8(w, s[None, :], (-8388736.0 * s)[None, :])
    if MODE == 2:
        return round_bf16_bits(ws)
    return to_bf16(ws).to(tl.float32)


@triton.jit
def row0(ptr, offs, ok, PAD: tl.constexpr):
    """[PAD, len(offs)]: row 0 the values at ptr + offs (masked by ok), the others 0: one row
    as the left operand of a tensor-core product (the GEMVs' MMA paths; PAD >= 16)."""
    rows = tl.arange(0, PAD)
    return tl.load(ptr + offs[None, :] + rows[:, None] * 0, mask=(rows[:, None] == 0) & ok[None, :],
                   other=0.0)
