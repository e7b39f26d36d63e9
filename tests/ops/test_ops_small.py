"""Quantized linear (int8, int4, fp8), fused residual RMSNorm and RoPE + cache write vs their
twins."""

import pytest
import torch

from grok1.golden import rel_l2 as rel_err
from grok1.model import rms_norm, rope_cos_sin
from grok1.ops._triton import use_kernel
from grok1.ops.linear import quant_linear
from grok1.ops.rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm_op
from grok1.ops.rope import rope_and_cache, rope_and_cache_ref
from grok1.quant import FP8, dequantize, int4, quantize, quantize_as

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not use_kernel(torch.empty(0, device=DEV)), reason="needs CUDA + Triton")]


# same dequantized values, f32 accumulation in both: only the order of the f32 sums and the
# final bf16 rounding differ (2^-9 per element): 4e-3 is a safe bound.
@pytest.mark.parametrize("M,K,N,G", [(1, 256, 192, 1), (37, 384, 96, 8), (130, 128, 200, 1),
                                     (5, 6144, 1024, 1)])
def test_quant_linear_matches_dequantized_matmul(M, K, N, G):
    g = torch.Generator().manual_seed(M + K)
    q, s = quantize(torch.randn(K, N, generator=g) / K ** 0.5, G)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    ref = (x.float() @ dequantize(q, s).float()).to(torch.bfloat16)
    out = quant_linear(x.to(DEV), q.to(DEV), s.to(DEV))
    assert rel_err(out.cpu(), ref) < 4e-3


def test_add_rms_norm_matches_twin_bit_for_bit_up_to_one_ulp():
    g = torch.Generator().manual_seed(0)
    h, a = (torch.randn(7, 6144, generator=g).to(torch.bfloat16).to(DEV) for _ in range(2))
    w1, w2 = (torch.rand(6144, generator=g).add(0.5).to(DEV) for _ in range(2))
    for got, ref in zip(add_rms_norm(h, a, w1, w2), add_rms_norm_ref(h, a, w1, w2)):
        assert rel_err(got, ref) < 4e-3
    assert rel_err(rms_norm_op(a, w1), rms_norm(a, w1)) < 4e-3


def test_rope_and_cache_write_match_twin():
    g = torch.Generator().manual_seed(1)
    M, N, K, H = 9, 48, 8, 128
    q, k, v = (torch.randn(M, n, H, generator=g).to(torch.bfloat16).to(DEV) for n in (N, K, K))
    pos = torch.randint(0, 8000, (1, M), generator=g).to(DEV)
    cos, sin = (t[0] for t in rope_cos_sin(pos, H))
    caches = [torch.zeros(6, 16, K, H, dtype=torch.bfloat16, device=DEV) for _ in range(4)]
    slots = torch.randperm(96, generator=g)[:M].to(DEV)
    ref = rope_and_cache_ref(q, k, v, cos, sin, caches[0], caches[1], slots)
    out = rope_and_cache(q, k, v, cos, sin, caches[2], caches[3], slots)
    assert rel_err(out, ref) < 4e-3
    assert rel_err(caches[2], caches[0]) < 4e-3 and torch.equal(caches[3], caches[1])


# one launch over q/k/v-like matrices sharing x: same values as each dequantized matmul, f32
# sums in another order, rounded once to bf16 (4e-3 as above). dequant: the instructions of
# bf16(w * s) (GemvTiles.DEQUANT; 1 converts int8 through the float bits, 0 through the
# conversion unit: what this test's former MAGIC key meant, which the GEMV never read); mma: the
# products on the tensor cores (GemvTiles.MMA; K 130 has no K tile of 16, so it falls back)
@pytest.mark.parametrize("mma", [0, 1], ids=["fma", "mma"])
@pytest.mark.parametrize("K,Ns,G,dequant", [(256, (192, 64, 64), 1, 1), (384, (96, 200), 8, 0),
                                            (6144, (1024,), 8, 1), (130, (40, 72, 24, 56), 1, 1)])
def test_quant_gemv_several_matrices_match_dequantized_matmuls(K, Ns, G, dequant, mma):
    from grok1.ops.linear import quant_gemv
    g = torch.Generator().manual_seed(K + len(Ns))
    mats = [quantize(torch.randn(K, n, generator=g) / K ** 0.5, G) for n in Ns]
    x = torch.randn(1, K, generator=g).to(torch.bfloat16)
    cfg = {"DEQUANT": dequant, "MMA": mma, "BK": 64 if mma else 32}
    outs = quant_gemv(x.to(DEV), [(q.to(DEV), s.to(DEV)) for q, s in mats], config=cfg)
    assert len(outs) == len(Ns)
    for (q, s), out in zip(mats, outs):
        ref = (x.float() @ dequantize(q, s).float()).to(torch.bfloat16)
        assert out.shape == ref.shape and out.dtype == torch.bfloat16
        assert rel_err(out.cpu(), ref) < 4e-3
    # the unsummed K splits (reduce=False) sum to the same values
    parts = quant_gemv(x.to(DEV), [(q.to(DEV), s.to(DEV)) for q, s in mats], config=cfg,
                       reduce=False)
    for part, out in zip(parts, outs):
        assert part.dtype == torch.float32 and part.shape[1:] == out.shape
        assert rel_err(part.sum(0).to(torch.bfloat16).cpu(), out.cpu()) < 4e-3


# int4 (groups of 128 and 64 inputs; K = 192: a short last group of 64) and fp8 attention
# projections through QuantLinear, against the twin model.Linear (dequantize_as, then the
# matmul): the same dequantized values and 4e-3 budget as int8's. M = 1 takes the GEMV, the
# others the MMA kernel (M <= 64 with its K split: f32 partials summed after).
@pytest.mark.parametrize("fmt", [int4(128), int4(64), FP8], ids=lambda f: f.label())
@pytest.mark.parametrize("M,K,N", [(1, 256, 192), (1, 192, 200), (37, 384, 96), (130, 192, 200),
                                   (5, 1024, 256)])
def test_quant_linear_int4_and_fp8_match_the_twin(fmt, M, K, N):
    from grok1.model import Linear
    from grok1.ops.linear import QuantLinear
    g = torch.Generator().manual_seed(M + K + N)
    lin = Linear(K, N, weights=fmt)
    q, s = quantize_as(fmt, torch.randn(K, N, generator=g) / K ** 0.5, 1)
    lin.weight.copy_(q)
    lin.scales.copy_(s)
    lin = lin.to(DEV)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).to(DEV)
    kernel = QuantLinear(lin)
    assert kernel.kernel_ok and kernel.weights == fmt and not kernel.quantized
    out, ref = kernel(x), lin(x)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert rel_err(out.cpu(), ref.cpu()) < 4e-3


# q/k/v-like int4 and fp8 matrices sharing x in one GEMV launch (project_many, the engine's
# decode), each output's K-split partial sums against its twin
@pytest.mark.parametrize("fmt", [int4(128), int4(64), FP8], ids=lambda f: f.label())
def test_project_many_int4_and_fp8_in_one_launch_match_the_twins(fmt):
    from grok1.model import Linear, PartialSums
    from grok1.ops.linear import QuantLinear, project_many
    g = torch.Generator().manual_seed(7)
    K, Ns = 384, (192, 64, 64)
    lins = []
    for n in Ns:
        lin = Linear(K, n, weights=fmt)
        q, s = quantize_as(fmt, torch.randn(K, n, generator=g) / K ** 0.5, 1)
        lin.weight.copy_(q)
        lin.scales.copy_(s)
        lins.append(lin.to(DEV))
    x = torch.randn(1, K, generator=g).to(torch.bfloat16).to(DEV)
    outs = project_many(x, [QuantLinear(lin) for lin in lins])
    for lin, out in zip(lins, outs):
        assert isinstance(out, PartialSums)
        assert rel_err(out.value().cpu(), lin(x).cpu()) < 4e-3


def test_quant_linear_bad_calls_raise_one_line_errors():
    g = torch.Generator().manual_seed(3)
    q, s = quantize_as(int4(128), torch.randn(256, 64, generator=g), 1)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^quant_linear: weights of dtype torch.uint8 need"):
        quant_linear(x.to(DEV), q.to(DEV), s.to(DEV))
    with pytest.raises(ValueError, match=r"^quant_linear: int4-g128 weights for input dim 512"):
        quant_linear(torch.randn(1, 512).to(torch.bfloat16).to(DEV), q.to(DEV), s.to(DEV),
                     weights=int4(128))


# partial sums [S, M, A, D] (a GEMV's K splits, the MoE's slots) are summed in f32 and rounded
# to bf16 inside the fused residual norm, as the twin sums them first
@pytest.mark.parametrize("S,A", [(1, 1), (3, 1), (4, 2)])
def test_add_rms_norm_sums_partials_like_twin(S, A):
    from grok1.model import PartialSums, summed
    g = torch.Generator().manual_seed(S * 10 + A)
    M, D = 3, 6144
    h = torch.randn(M, D, generator=g).to(torch.bfloat16).to(DEV)
    parts = torch.randn(S, M, A, D, generator=g).to(DEV)
    w1, w2 = (torch.rand(D, generator=g).add(0.5).to(DEV) for _ in range(2))
    got = add_rms_norm(h, PartialSums(parts, (0, 2)), w1, w2)
    ref = add_rms_norm_ref(h, PartialSums(parts, (0, 2)), w1, w2)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 4e-3
    # and the twin's sum is the plain one (a wrong axis would differ at O(1))
    assert rel_err(summed(PartialSums(parts, (0, 2))),
                   parts.sum(dim=(0, 2)).to(torch.bfloat16)) < 4e-3
    if A == 1:  # a GEMV's K splits [S, M, D], summed over S alone
        got = add_rms_norm(h, PartialSums(parts[:, :, 0]), w1, w2)
        for a, b in zip(got, ref):
            assert rel_err(a, b) < 4e-3
    f32 = parts.sum(dim=(0, 2))  # an all-reduced f32 sum: rounded in the kernel
    for a, b in zip(add_rms_norm(h, f32, w1, w2), add_rms_norm_ref(h, f32, w1, w2)):
        assert rel_err(a, b) < 4e-3


def test_rope_and_cache_take_partial_sums():
    g = torch.Generator().manual_seed(5)
    S, M, N, K, H = 3, 1, 48, 8, 128
    parts = torch.randn(S, M, (N + 2 * K) * H, generator=g).to(DEV)
    q, k, v = (t.view(S, M, -1, H) for t in parts.split([N * H, K * H, K * H], dim=2))
    pos = torch.randint(0, 8000, (1, M), generator=g).to(DEV)
    cos, sin = (t[0] for t in rope_cos_sin(pos, H))
    caches = [torch.zeros(6, 16, K, H, dtype=torch.bfloat16, device=DEV) for _ in range(4)]
    slots = torch.tensor([37], device=DEV)
    summed = [t.sum(0).to(torch.bfloat16) for t in (q, k, v)]
    ref = rope_and_cache_ref(*summed, cos, sin, caches[0], caches[1], slots)
    from grok1.model import PartialSums
    out = rope_and_cache(*map(PartialSums, (q, k, v)), cos, sin, caches[2], caches[3], slots)
    assert rel_err(out, ref) < 4e-3
    assert rel_err(caches[2], caches[0]) < 4e-3 and rel_err(caches[3], caches[1]) < 4e-3
    assert caches[3].abs().sum() > 0


# the router kernels vs model.route: same logits up to f32 summation order, same choices and
# gates (random logits have no near-ties at this scale)
@pytest.mark.parametrize("M,D,E,A", [(1, 6144, 8, 2), (5, 6144, 8, 2), (3, 256, 8, 2),
                                     (2, 320, 6, 3)])
def test_router_kernel_matches_route(M, D, E, A):
    from grok1.model import route
    from grok1.ops.router import route_op
    g = torch.Generator().manual_seed(M + D + E)
    x = torch.randn(M, D, generator=g).to(torch.bfloat16).to(DEV)
    router = (torch.randn(D, E, generator=g) / D ** 0.5).to(DEV)
    logits, gates, ids = route_op(x, router, A)
    ref_logits, ref_gates, ref_ids = route(x, router, A)
    assert ids.dtype == ref_ids.dtype and gates.shape == ref_gates.shape
    assert rel_err(logits, ref_logits) < 1e-5
    assert torch.equal(ids, ref_ids)
    assert rel_err(gates, ref_gates) < 1e-5


# Grok-2's router cap (grok2 SPEC 2.5): logits of std ~40 so 30 * tanh(x / 30) changes them
@pytest.mark.parametrize("M,D,E,A", [(1, 512, 8, 2), (5, 256, 8, 2)])
def test_router_kernel_caps_logits_like_route(M, D, E, A):
    from grok1.model import route
    from grok1.ops.router import route_op
    g = torch.Generator().manual_seed(M + D)
    x = torch.randn(M, D, generator=g).to(torch.bfloat16).to(DEV)
    router = (torch.randn(D, E, generator=g) * 40 / D ** 0.5).to(DEV)
    logits, gates, ids = route_op(x, router, A, softcap=30.0)
    ref_logits, ref_gates, ref_ids = route(x, router, A, softcap=30.0)
    uncapped, _, _ = route(x, router, A)
    assert rel_err(logits, ref_logits) < 1e-5 and rel_err(uncapped, ref_logits) > 0.05
    assert torch.equal(ids, ref_ids)
    assert rel_err(gates, ref_gates) < 1e-5


# ---- the int4 dequantizer alone (dot_triton.int4_pair_bf16: packed bf16 FMAs on the GPU) ---
# Every code of every nibble, scales of both signs from 2^-30 to 2^10 and the bf16 rounding's
# ties: bit for bit the twin's bf16(q * s), as stored tiles and transposed (the grouped GEMMs').
try:  # the kernel below is defined only where Triton is (the tests then skip without CUDA)
    import triton
    import triton.language as tl

    from grok1.ops.dot_triton import int4_pair_bf16
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def int4_tiles_kernel(w_ptr, s_ptr, out_ptr, R, N, TRANS: tl.constexpr, BR: tl.constexpr,
                          BN: tl.constexpr):
        r = tl.arange(0, BR)
        n = tl.arange(0, BN)
        s = tl.load(s_ptr + n, mask=n < N, other=0.0)
        lo, hi = int4_pair_bf16(w_ptr, r, n, N, r < R, n < N, s, False, TRANS)
        if TRANS:  # [BN, BR] tiles
            offs = 2 * r[None, :] * N + n[:, None]
            ok = (r[None, :] < R) & (n[:, None] < N)
        else:
            offs = 2 * r[:, None] * N + n[None, :]
            ok = (r[:, None] < R) & (n[None, :] < N)
        tl.store(out_ptr + offs, lo, mask=ok)
        tl.store(out_ptr + offs + N, hi, mask=ok)


@pytest.mark.parametrize("trans", [False, True], ids=["stored", "transposed"])
def test_int4_dequantizer_is_the_twin_bit_for_bit(trans):
    from grok1.quant import dequantize_as, pack_int4

    g = torch.Generator().manual_seed(11)
    R, N = 24, 200  # 48 input rows; N not a multiple of the tile: masked columns
    codes = torch.randint(-8, 8, (2 * R, N), generator=g, dtype=torch.int8)
    codes[:16, :16] = torch.arange(-8, 8, dtype=torch.int8)[:, None]  # every code
    exps = torch.randint(-30, 11, (N,), generator=g).float()
    s = (torch.rand(N, generator=g) + 1) * 2 ** exps * torch.where(torch.rand(N, generator=g) < .3, -1, 1)
    s = s.to(torch.bfloat16)
    s[:4] = torch.tensor([1.0, 3.0, 0.3, 1.0 + 2 ** -7])  # products with rounding ties
    w = pack_int4(codes)
    ref = dequantize_as(int4(2 * R), w, s[None, :])
    out = torch.full((2 * R, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    int4_tiles_kernel[(1,)](w.to(DEV), s.to(DEV), out, R, N, TRANS=trans, BR=32, BN=256)
    assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16))
