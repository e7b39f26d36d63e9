"""Tuned launch configs: exact GPU, then its architecture, then defaults (CPU-only logic)."""

import itertools
import json
from pathlib import Path

import pytest

# The shapes whose launch values must not move when the config reader changes: Grok-1's expert
# widths whole and at 2/4/8/16-way shards, expert counts of expert-parallel ranks, pair and row
# counts on both sides of every tuned entry and default threshold, tiny test widths; tuned
# Hopper cards (exact name, and an H200 falling back to sm_90), an untuned GPU, the CPU.
DEVICES = ["NVIDIA_H100_80GB_HBM3|sm_90", "NVIDIA_H200|sm_90", "NVIDIA_A100-SXM4-80GB|sm_80"]
PAIRS = [1, 2, 3, 4, 8, 16, 17, 32, 33, 64, 65, 128, 256, 512, 513, 1024, 2048, 4096, 8192,
         16384]
MOE_SHAPES = ([(P, 6144, F, E, True) for F, E, P in itertools.product(
    [32768, 16384, 8192, 4096, 2048], [8, 4], PAIRS)]
    + [(P, 6144, 32768, 8, False) for P in PAIRS]
    + [(P, 256, 512, 8, q) for P, q in itertools.product([1, 2, 6, 66, 600], [True, False])])
LINEAR_SHAPES = [(M, K, N) for (K, N), M in itertools.product(
    [(6144, 6144), (6144, 1024), (6144, 8192), (256, 192)],
    [1, 2, 16, 17, 64, 65, 128, 1000, 8192])]
GEMV_SHAPES = [(6144, (6144, 1024, 1024)), (6144, (6144,)), (6144, (3072, 512, 512)),
               (3072, (6144,)), (6144, (1536, 256, 256)), (1536, (6144,)),
               (6144, (768, 128, 128)), (768, (6144,)), (256, (192, 64, 64)), (384, (96, 200))]
RESOLVED = Path(__file__).parent / "data" / "tile_configs_resolved.json"
MOE_GEMM_KEYS = ("BM", "BN1", "BK1", "W1", "S1", "BN2", "BK2", "W2", "S2", "SPLIT")
MOE_GEMV_KEYS = ("GBN1", "GBK1", "GW1", "GSPLIT1", "GS1", "GBN2", "GBK2", "GW2", "GSPLIT", "GS2",
                 "DEQUANT")


def resolved_launch(op: str, device: str, args: tuple) -> dict:
    """Every value a launch for these shapes takes, defaults filled in as the launch fills them."""
    from grok1.ops.linear import gemv_config, linear_config
    from grok1.ops.moe import GEMV_DEFAULTS, moe_config

    if op == "moe":
        cfg = moe_config(*args, device)
        gemv = {**GEMV_DEFAULTS, **cfg}
        return {"GEMV": cfg.get("GEMV", 0), **{k: cfg[k] for k in MOE_GEMM_KEYS},
                "MAGIC": cfg.get("MAGIC", 0), **{k: gemv[k] for k in MOE_GEMV_KEYS}}
    if op == "linear":
        return dict(linear_config(*args, device))
    K, Ns = args
    return dict(gemv_config(K, list(Ns), device))


def case_name(op: str, device: str, args: tuple) -> str:
    return f"{op} {device} {args}"


def test_resolved_launch_values_are_those_of_the_tables_before_they_were_typed():
    """Captured from main at 382359f (untyped dict tables) for the shapes above: the file maps
    each case to its index in a list of the distinct launch values."""
    from grok1.ops._triton import load_tuned

    load_tuned.cache_clear()
    captured = json.loads(RESOLVED.read_text())
    cases = [(op, device, args) for device in DEVICES for op, shapes in
             [("moe", MOE_SHAPES), ("linear", LINEAR_SHAPES), ("gemv", GEMV_SHAPES)]
             for args in shapes]
    assert len(captured["cases"]) == len(cases)
    for op, device, args in cases:
        want = captured["launches"][captured["cases"][case_name(op, device, args)]]
        assert resolved_launch(op, device, args) == want, (op, device, args)


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
    from grok1.engine.bench_cli import staged_sweep

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
