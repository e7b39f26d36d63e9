"""Tuned launch configs: exact GPU, then its architecture, then defaults (CPU-only logic)."""


def test_tuned_moe_configs_fall_back_to_the_architecture_then_to_gemv_defaults():
    from grok1.ops._triton import load_tuned
    from grok1.ops.moe import moe_config

    load_tuned.cache_clear()
    # an H200 has no table of its own: it takes the sm_90 one (tuned on an H100)
    h200 = moe_config(2, 6144, 32768, 8, True, "NVIDIA_H200|sm_90")
    assert h200 == moe_config(2, 6144, 32768, 8, True, "NVIDIA_H100_80GB_HBM3|sm_90")
    assert h200.get("GEMV") == 2
    # a tensor-parallel shard's width is not tuned: batch-1 decode still takes the GEMV
    assert moe_config(2, 6144, 8192, 8, True, "NVIDIA_H200|sm_90").get("GEMV") == 2
    assert "GEMV" not in moe_config(64, 6144, 8192, 8, True, "NVIDIA_H200|sm_90")
