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


def test_staged_sweep_builds_each_stage_on_the_best_before_it_and_skips_failures():
    from bench._common import staged_sweep

    times = {(1, 1): 5.0, (2, 1): 3.0, (2, 2): 4.0, (2, 3): 2.0}
    tried = []

    def measure(cfg):
        tried.append((cfg["a"], cfg["b"]))
        if cfg["a"] == 3:
            raise RuntimeError("does not fit")
        return times[cfg["a"], cfg["b"]]

    best = staged_sweep({"a": 1, "b": 1, "c": 0}, [[{}, {"a": 2}, {"a": 3}],
                                                   [{"b": 2}, {"b": 3}]], measure)
    # stage 2 starts from stage 1's winner (a=2), not from the base or from a failed config
    assert tried == [(1, 1), (2, 1), (3, 1), (2, 2), (2, 3)]
    assert best == (2.0, {"a": 2, "b": 3, "c": 0})
    assert staged_sweep({"a": 3, "b": 1}, [[{}]], measure) is None


def test_tuning_tables_hold_tile_shapes_only_never_numerics():
    """The numerics issue: a tuning table must not pick a numerics (the old LATE key chose the
    int8 products' rounding). The shipped tables carry none, and one slipped in is ignored."""
    import json

    from grok1.ops._triton import CONFIG_DIR, load_tuned
    from grok1.ops.moe import NUMERICS_KEYS, moe_config

    def keys(o):
        if isinstance(o, dict):
            for k, v in o.items():
                yield k
                yield from keys(v)

    for path in CONFIG_DIR.glob("*.json"):
        assert not set(keys(json.loads(path.read_text()))) & set(NUMERICS_KEYS), path
    load_tuned.cache_clear()
    tables = load_tuned("moe", "NVIDIA_H100_80GB_HBM3|sm_90")
    key = next(k for k in tables if k.startswith("D6144_F32768"))
    m = next(iter(tables[key]))
    tables[key][m]["LATE"] = 1  # as an older table had it
    try:
        assert "LATE" not in moe_config(int(m), 6144, 32768, 8, True,
                                        "NVIDIA_H100_80GB_HBM3|sm_90")
    finally:
        load_tuned.cache_clear()
