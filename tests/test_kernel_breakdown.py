"""bench/kernel_breakdown.py: kernel names (grok1.ops' Triton kernels, NCCL, cuBLAS, ATen) go to
the parts of a layer, per-layer kernels are told from once-a-step ones by their call counts,
and the full-depth estimate is per layer x depth + the once-a-step work."""

import pytest

from bench.kernel_breakdown import GROUP_NAMES, breakdown, group_of


@pytest.mark.parametrize("name, group", [
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "all-reduce"),
    ("gemv3_kernel", "attention projections"),
    ("linear_kernel", "attention projections"),
    ("paged_attention_kernel", "attention"),
    ("attention_combine_kernel", "attention"),
    ("moe_mma_gemv_gate_up_kernel", "MoE gate/up"),
    ("moe_gemv_gate_up_kernel", "MoE gate/up"),
    ("moe_gate_up_kernel", "MoE gate/up"),
    ("moe_gelu_combine_kernel", "MoE gate/up"),
    ("moe_mma_gemv_down_kernel", "MoE down"),
    ("moe_down_kernel", "MoE down"),
    ("router_logits_kernel", "router"),
    ("router_topk_kernel", "router"),
    ("moe_align_kernel", "router"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 1, false>(...)", "router"),
    ("rmsnorm_kernel", "norms"),
    ("rope_cache_kernel", "rope/cache"),
    ("nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT", "unembed/sampling"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "unembed/sampling"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float, ...>>", "other"),
    ("Memcpy HtoD (Pinned -> Device)", "other"),
])
def test_kernel_names_go_to_their_part_of_the_layer(name, group):
    assert group_of(name) == group


def test_per_layer_and_once_a_step_kernels_and_the_full_depth_estimate():
    steps, layers = 10, 4
    kernels = [  # (name, calls over the run, total us over the run)
        ("gemv3_kernel", steps * layers, 20.0 * steps * layers),  # 20 us a layer
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 2 * steps * layers, 12.5 * 2 * steps * layers),
        ("moe_mma_gemv_gate_up_kernel", steps * layers, 130.0 * steps * layers),
        ("nvjet_sm90_tst_256x8", steps, 90.0 * steps),  # the unembedding: once a step
        ("void at::native::index_elementwise_kernel", 3 * steps, 2.0 * 3 * steps),  # inputs
        ("rmsnorm_kernel", 2 * steps * layers + steps, 3.0 * (2 * steps * layers + steps)),
    ]
    b = breakdown(kernels, steps, layers, full_layers=64)
    assert set(b["per_layer_us"]) == set(GROUP_NAMES)
    assert b["per_layer_us"]["attention projections"] == pytest.approx(20.0)
    assert b["per_layer_us"]["all-reduce"] == pytest.approx(25.0)
    assert b["per_layer_us"]["MoE gate/up"] == pytest.approx(130.0)
    assert b["per_step_us"]["unembed/sampling"] == pytest.approx(90.0)
    assert b["per_step_us"]["other"] == pytest.approx(6.0)
    # 2 norms a layer + the final norm once a step
    assert b["per_layer_us"]["norms"] == pytest.approx(6.0)
    assert b["per_step_us"]["norms"] == pytest.approx(3.0)
    layer = 20.0 + 25.0 + 130.0 + 6.0
    once = 90.0 + 6.0 + 3.0
    assert b["layer_us"] == pytest.approx(layer) and b["step_once_us"] == pytest.approx(once)
    assert b["step_us"] == pytest.approx(layer * layers + once)
    assert b["full_model_ms"] == pytest.approx((layer * 64 + once) / 1e3)
    assert b["kernels"][0]["name"] == "moe_mma_gemv_gate_up_kernel"
    assert b["kernels"][0]["calls_per_layer"] == 1


def test_parallel_decode_attaches_each_breakdown_to_its_row_only():
    """bench/parallel_decode.py --breakdown: decode rows by batch, prefill rows by tokens (whose
    "batch" is 1 too), and the all-reduce rows, which have neither key, left alone (they once
    raised KeyError after the timings and lost the run's rows)."""
    from bench.parallel_decode import attach_breakdowns

    rows = [{"kind": "decode", "batch": 1}, {"kind": "decode", "batch": 8},
            {"kind": "prefill", "batch": 1, "prefill_tokens": 1024},
            {"kind": "allreduce_f32", "tokens": 1, "graph": True, "us": 14.4}]
    parts = {("decode", 1): {"layer_us": 262.0}, ("prefill", 1024): {"layer_us": 4751.0}}
    attach_breakdowns(rows, parts)
    assert [r.get("breakdown") for r in rows] == [
        {"layer_us": 262.0}, None, {"layer_us": 4751.0}, None]
