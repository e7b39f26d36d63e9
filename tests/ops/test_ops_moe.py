"""Fused MoE kernels vs the twin (model.moe_ref) on fresh random inputs; needs CUDA (or Triton's
interpreter with TRITON_INTERPRET=1)."""

import pytest
import torch
from _engine_helpers import quantized_linears

from grok1.golden import rel_l2 as rel_err
from grok1.model import moe_ref, route
from grok1.ops._triton import use_kernel
from grok1.ops.moe import fused_moe, moe_align, moe_align_ref
from grok1.quant import FP8, int4

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not use_kernel(torch.empty(0, device=DEV)),
                                  reason="needs CUDA + Triton (or TRITON_INTERPRET=1)")
pytestmark = [pytest.mark.gpu, needs_kernel]


def moe_case(M, D, F, quant, seeds, *, only=None, out_dtype=None, E=8, **math):
    """A fresh random case: expert Linears (seeded seeds[0]), x [M, D] and a router (seeds[1];
    `only`: the experts that get tokens, the others' logits pushed down), the top-2 routing and
    the twin's output. -> (x, gates, ids, linears, ref)."""
    lins = quantized_linears(E, D, F, quant, seed=seeds[0], device=DEV)
    g = torch.Generator().manual_seed(seeds[1])
    x = torch.randn(M, D, generator=g).to(torch.bfloat16).to(DEV)
    router = torch.randn(D, E, generator=g).to(DEV)
    if only is not None:
        router[:, [e for e in range(E) if e not in only]] = -100.0
    _, gates, ids = route(x, router, 2)
    return x, gates, ids, lins, moe_ref(x, gates, ids, *lins, out_dtype=out_dtype, **math)


def run_fused(x, gates, ids, lins, config=None, **kwargs):
    wg, wu, wd = lins
    return fused_moe(x, gates, ids, wg.weight, wg.scales, wu.weight, wu.scales, wd.weight,
                     wd.scales, config, weights=wg.weights, **kwargs)


# dropped: a third of the pairs get id -1 (an expert-parallel rank's remote experts)
@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("M,block_m,used", [(1, 16, 8), (37, 16, 8), (300, 64, 8), (9, 16, 3)])
def test_align_kernel_equals_torch_twin(M, block_m, used, dropped):
    g = torch.Generator().manual_seed(M)
    ids = torch.stack([torch.randperm(used, generator=g)[:2] for _ in range(M)])
    if dropped:
        ids[torch.rand(ids.shape, generator=g) < 1 / 3] = -1
    ids = ids.to(DEV)
    ref, kern = moe_align_ref(ids, 8, block_m), moe_align(ids, 8, block_m)
    assert torch.equal(ref[0], kern[0]) and torch.equal(ref[1], kern[1])
    # every kept pair appears exactly once, no dropped one; unused experts own no block
    got = ref[0][ref[0] < ids.numel()].sort().values
    kept = (ids.flatten() >= 0).nonzero()[:, 0].int()
    assert torch.equal(got.cpu(), kept.cpu())


# bf16 noise budget: h is rounded to bf16 before the down projection (2^-9 relative per
# element, averaged over F) where the twin keeps f32; the gate/up outputs round identically.
# 1.5e-2 is ~4x the error measured; a wrong index or scale gives O(1).
@pytest.mark.parametrize("quant", [True, False])
@pytest.mark.parametrize("M", [1, 3, 33, 200])
def test_fused_moe_matches_moe_ref(quant, M):
    x, gates, ids, lins, ref = moe_case(M, 256, 512, quant, (M, 100 + M),
                                        only=[0, 5] if M == 3 else None)
    out = run_fused(x, gates, ids, lins)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1.5e-2


# exact: the opt-in exact int8 products (a numerics, named at the call; older tables had it as
# a tile key, LATE, which had been ignored since the tables lost the right to choose numerics)
@pytest.mark.parametrize("cfg,exact", [
    ({"BM": 16, "BN1": 64, "BK1": 64, "W1": 4, "S1": 2, "BN2": 32, "BK2": 64, "W2": 4, "S2": 2, "SPLIT": 3}, False),
    ({"BM": 16, "BN1": 64, "BK1": 64, "W1": 4, "S1": 2, "BN2": 32, "BK2": 16, "W2": 4, "S2": 2, "SPLIT": 3}, True),
    ({"BM": 32, "BN1": 64, "BK1": 64, "W1": 4, "S1": 2, "BN2": 64, "BK2": 32, "W2": 4, "S2": 2, "SPLIT": 1}, True),
    ({"BM": 64, "BN1": 128, "BK1": 64, "W1": 8, "S1": 3, "BN2": 128, "BK2": 64, "W2": 8, "S2": 3, "SPLIT": 1}, False)])
def test_fused_moe_other_tiles_and_odd_sizes(cfg, exact):
    # D, F not multiples of the 128-wide N tiles
    x, gates, ids, lins, ref = moe_case(45, 192, 384, True, (7, 8))
    out = run_fused(x, gates, ids, lins, cfg, exact_int8_products=exact)
    assert rel_err(out, ref) < 1.5e-2


# pairs with id -1 (computed by another rank) add exactly 0 and the rest is the twin's with
# those pairs' gates 0, on both paths (grouped GEMMs skip them; the GEMV runs them with gate 0)
@pytest.mark.parametrize("M", [1, 40])
def test_fused_moe_skips_dropped_pairs(M):
    x, gates, ids, lins, _ = moe_case(M, 256, 512, True, (M, 7))
    g = torch.Generator().manual_seed(M)
    drop = (torch.rand(ids.shape, generator=g) < 0.4).to(DEV)
    drop[0, 0], drop[0, 1] = True, False  # some pairs of each kind, also at M = 1
    ref = moe_ref(x, torch.where(drop, 0.0, gates), ids, *lins)
    out = run_fused(x, gates, torch.where(drop, -1, ids), lins, has_dropped=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1.5e-2


GEMV = {"GEMV": 64, "GBN1": 64, "GBK1": 32, "GW1": 4, "GBN2": 64, "GBK2": 32, "GW2": 4,
        "GSPLIT": 4, "MAGIC": 1}


# the GEMV path (decode): exact int8 * bf16 products summed in f32 and scaled per group, where
# the twin rounds bf16(w * s) first; plus h rounded to bf16: the same 1.5e-2 budget as above.
# GSPLIT1 > 1: the gate/up K range split too (f32 partials + the combine kernel), 3 ways so
# the last split is short and masked.
# gmma: the same GEMV contract on the tensor cores (MoeTiles.GMMA; K tiles of 16 and more)
@pytest.mark.parametrize("gmma", [0, 1])
@pytest.mark.parametrize("quant", [True, False])
@pytest.mark.parametrize("M,D,F,magic,gsplit1", [(1, 256, 512, 1, 1), (1, 192, 384, 0, 3),
                                                 (3, 192, 384, 1, 1), (5, 256, 512, 1, 3),
                                                 (1, 256, 512, 1, 4)])
def test_fused_moe_gemv_path_matches_moe_ref(quant, M, D, F, magic, gsplit1, gmma):
    x, gates, ids, lins, ref = moe_case(M, D, F, quant, (11 + M, 200 + M + D),
                                        only=[2, 6] if M == 3 else None)
    out = run_fused(x, gates, ids, lins, {**GEMV, "MAGIC": magic, "GSPLIT1": gsplit1,
                                          "GMMA": gmma})
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1.5e-2


def test_fused_moe_mma_path_with_magic_conversion_matches_moe_ref():
    x, gates, ids, lins, ref = moe_case(70, 256, 512, True, (21, 22))
    cfg = {"BM": 32, "BN1": 64, "BK1": 64, "W1": 4, "S1": 2, "BN2": 64, "BK2": 64, "W2": 4,
           "S2": 2, "SPLIT": 2, "MAGIC": 1}
    for exact in (False, True):  # MAGIC converts int8 on the exact-products path only
        out = run_fused(x, gates, ids, lins, cfg, exact_int8_products=exact)
        assert rel_err(out, ref) < 1.5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA graphs")
@pytest.mark.parametrize("M,config,seeds,trials", [(4, None, (3, 9), 3), (1, GEMV, (31, 32), 4)],
                         ids=["grouped_gemm", "gemv"])
def test_fused_moe_under_cuda_graph_replay_tracks_new_inputs(M, config, seeds, trials):
    E, D, F = 8, 256, 512
    lins = quantized_linears(E, D, F, True, seed=seeds[0], device=DEV)
    g = torch.Generator().manual_seed(seeds[1])
    router = torch.randn(D, E, generator=g).to(DEV)
    x_static = torch.randn(M, D, generator=g).to(torch.bfloat16).to(DEV)

    def fn():
        _, gates, ids = route(x_static, router, 2)
        return run_fused(x_static, gates, ids, lins, config)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    seen = set()
    for _ in range(trials):
        x_static.copy_(torch.randn(M, D, generator=g).to(torch.bfloat16))
        graph.replay()
        _, gates, ids = route(x_static, router, 2)
        seen.add(tuple(ids.flatten().tolist()))
        ref = moe_ref(x_static, gates, ids, *lins)
        assert rel_err(out, ref) < 1.5e-2
    assert len(seen) > 1  # the replays saw other experts chosen, not one frozen routing

# The numerics of the int8 paths against the twin, tighter than the shared budget above: the
# default dequantizes each tile as the reference does (bf16(w * s)), so only h's bf16 rounding
# and the f32 order differ (~0.16 % measured on an H100 at full width); exact_int8_products
# and the GEMV scale the exact int8 products afterwards, one more departure (~0.45 %). A wrong
# scale group or a lost rounding moves these by far more.
MMA_FULL_WIDTH = {"BM": 32, "BN1": 128, "BK1": 128, "W1": 4, "S1": 2, "BN2": 64, "BK2": 128,
                  "W2": 4, "S2": 2, "SPLIT": 2}


@pytest.mark.parametrize("M,cfg,exact,bound", [
    (42, MMA_FULL_WIDTH, False, 4e-3), (42, MMA_FULL_WIDTH, True, 9e-3), (1, GEMV, False, 9e-3)],
    ids=["mma_reference_rounding", "mma_late_scale", "gemv"])
def test_int8_paths_stay_close_to_the_twin_at_full_width(M, cfg, exact, bound):
    if DEV != "cuda":
        pytest.skip("full width: CUDA only")
    x, gates, ids, lins, ref = moe_case(M, 6144, 8192, True, (3, 4), out_dtype=torch.float32)
    out = run_fused(x, gates, ids, lins, cfg, out_dtype=torch.float32, exact_int8_products=exact)
    assert rel_err(out, ref) < bound


# Grok-2's MoE math (grok2 SPEC 2.5): exact GELU, SGLang's f32 gates, bf16 GELU product and
# per-slot bf16 outputs; bf16 weights (Grok-2's) and int8; the GEMV (M = 1, 3) and the grouped
# GEMM (M = 33) paths, unreduced terms summed as the engine does (sum_slots_sglang)
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("M", [1, 3, 33])
def test_fused_moe_grok2_math_matches_moe_ref(quant, M):
    from grok1.ops.moe import sum_slots_sglang
    math = {"gelu": "erf", "rounding": "sglang"}
    x, gates, ids, lins, ref = moe_case(M, 256, 512, quant, (M + 5, 300 + M), **math)
    out = run_fused(x, gates, ids, lins, **math)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1.5e-2
    terms = run_fused(x, gates, ids, lins, reduce=False, **math)
    assert torch.equal(sum_slots_sglang(terms, torch.bfloat16), out)
    grok1_math = moe_ref(x, gates, ids, *lins)
    assert rel_err(grok1_math, ref) > 1e-3  # the case sees the difference (GELU, roundings)


# ---- int4 (W4A16) and fp8 weights: the same kernels, another tile loader (WFMT) ------------
# Each dequantizes as quant.dequantize_as (bf16(q * s), one rounding) like int8's default, so
# the same 1.5e-2 budget holds (h rounded to bf16, f32 order); a wrong nibble, byte row or
# scale group gives O(1). int4 at groups of 128 and 64 inputs; at D = 192, F = 384 the last
# group of 128 is short (64 rows) and the 128-wide tiles are masked.
FORMATS = [int4(128), int4(64), FP8]
GMMA = {**GEMV, "GMMA": 1}
NARROW_K = {**GEMV, "GBK1": 16, "GBK2": 8}  # FMA GEMV K tiles below the tensor cores' 16


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
@pytest.mark.parametrize("M,D,F,cfg", [
    (1, 256, 512, None),  # P = 2: the untuned default (the GEMV on the tensor cores)
    (1, 256, 512, GEMV), (3, 192, 384, GEMV), (1, 256, 512, NARROW_K),
    (1, 192, 384, GMMA), (3, 256, 512, {**GMMA, "GSPLIT1": 3}),
    (1, 256, 512, {**GMMA, "GBK1": 16, "GBK2": 16}),
    (5, 256, 512, {"GEMV": 0}), (33, 192, 384, None), (200, 256, 512, None),
    (200, 256, 512, {"I4PAIR": 0}), (33, 192, 384, {"I4PAIR": 0, "BK1": 32, "BK2": 32})],
    ids=["default_p2", "gemv_p2", "gemv_p6_short_group", "gemv_narrow_tiles", "gmma_p2",
         "gmma_p6_split", "gmma_p2_narrow_tiles", "mma_p10", "mma_p66_short_group", "mma_p400",
         "mma_p400_rows", "mma_p66_rows_short_group"])
def test_int4_and_fp8_paths_match_moe_ref(fmt, M, D, F, cfg):
    x, gates, ids, lins, ref = moe_case(M, D, F, fmt, (40 + M + D, 500 + M + F),
                                        only=[1, 4] if M == 3 else None)
    assert lins[0].weights == fmt and lins[0].weight.dtype == fmt.storage_dtype
    out = run_fused(x, gates, ids, lins, cfg)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1.5e-2


def test_int4_and_fp8_bad_calls_raise_one_line_errors():
    x, gates, ids, lins, _ = moe_case(1, 256, 512, int4(128), (1, 2))
    wg, wu, wd = lins
    with pytest.raises(ValueError, match=r"^fused_moe: weights of dtype torch.uint8 need"):
        fused_moe(x, gates, ids, wg.weight, wg.scales, wu.weight, wu.scales, wd.weight,
                  wd.scales)
    with pytest.raises(ValueError, match=r"^fused_moe: exact_int8_products takes int8 "
                                         r"weights, not int4-g128$"):
        run_fused(x, gates, ids, lins, exact_int8_products=True)
    with pytest.raises(ValueError, match=r"^fused_moe: w_gate: int4-g64 scales have 2 groups"):
        fused_moe(x, gates, ids, wg.weight, wg.scales, wu.weight, wu.scales, wd.weight,
                  wd.scales, weights=int4(64))
