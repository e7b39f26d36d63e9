"""int8 linear, fused residual RMSNorm and RoPE + cache write vs their twins."""

import pytest
import torch

from grok1.model import rms_norm, rope_cos_sin
from grok1.ops._triton import use_kernel
from grok1.ops.linear import int8_linear
from grok1.ops.rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm_op
from grok1.ops.rope import rope_and_cache, rope_and_cache_ref
from grok1.quant import dequantize, quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not use_kernel(torch.empty(0, device=DEV)), reason="needs CUDA + Triton")]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# same dequantized values, f32 accumulation in both: only the order of the f32 sums and the
# final bf16 rounding differ (2^-9 per element): 4e-3 is a safe bound.
@pytest.mark.parametrize("M,K,N,G", [(1, 256, 192, 1), (37, 384, 96, 8), (130, 128, 200, 1),
                                     (5, 6144, 1024, 1)])
def test_int8_linear_matches_dequantized_matmul(M, K, N, G):
    g = torch.Generator().manual_seed(M + K)
    q, s = quantize(torch.randn(K, N, generator=g) / K ** 0.5, G)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    ref = (x.float() @ dequantize(q, s).float()).to(torch.bfloat16)
    out = int8_linear(x.to(DEV), q.to(DEV), s.to(DEV))
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
# sums in another order, rounded once to bf16 (4e-3 as above)
@pytest.mark.parametrize("K,Ns,G,magic", [(256, (192, 64, 64), 1, 1), (384, (96, 200), 8, 0),
                                          (6144, (1024,), 8, 1), (130, (40, 72, 24, 56), 1, 1)])
def test_int8_gemv_several_matrices_match_dequantized_matmuls(K, Ns, G, magic):
    from grok1.ops.linear import int8_gemv
    g = torch.Generator().manual_seed(K + len(Ns))
    mats = [quantize(torch.randn(K, n, generator=g) / K ** 0.5, G) for n in Ns]
    x = torch.randn(1, K, generator=g).to(torch.bfloat16)
    outs = int8_gemv(x.to(DEV), [(q.to(DEV), s.to(DEV)) for q, s in mats], config={"MAGIC": magic})
    assert len(outs) == len(Ns)
    for (q, s), out in zip(mats, outs):
        ref = (x.float() @ dequantize(q, s).float()).to(torch.bfloat16)
        assert out.shape == ref.shape and out.dtype == torch.bfloat16
        assert rel_err(out.cpu(), ref) < 4e-3
