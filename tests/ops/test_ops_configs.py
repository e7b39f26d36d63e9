"""Tuned launch configs: exact GPU, then its architecture, then defaults (CPU-only logic)."""

import dataclasses
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
RESOLVED = Path(__file__).resolve().parents[1] / "data" / "tile_configs_resolved.json"


def resolved_launch(op: str, device: str, args: tuple) -> dict:
    """Every value a launch for these shapes takes."""
    from grok1.ops.linear import gemv_config, linear_config
    from grok1.ops.moe import moe_config

    if op == "moe":  # (the captured case names say the weights as quantized: True, False)
        P, D, F, E, quant = args
        return moe_config(P, D, F, E, "int8" if quant else "bf16", device).as_dict()
    if op == "linear":
        return linear_config(*args, device).as_dict()
    K, Ns = args
    return gemv_config(K, list(Ns), device).as_dict()


def case_name(op: str, device: str, args: tuple) -> str:
    return f"{op} {device} {args}"


def all_cases() -> list[tuple[str, str, tuple]]:
    return [(op, device, args) for device in DEVICES for op, shapes in
            [("moe", MOE_SHAPES), ("linear", LINEAR_SHAPES), ("gemv", GEMV_SHAPES)]
            for args in shapes]


def capture() -> None:
    """Rewrite the captured file from the tables as they are (after retuning on purpose:
    `python tests/ops/test_ops_configs.py`); the diff shows every launch that moved."""
    launches: list[dict] = []
    cases = {}
    for op, device, args in all_cases():
        value = resolved_launch(op, device, args)
        if value not in launches:
            launches.append(value)
        cases[case_name(op, device, args)] = launches.index(value)
    RESOLVED.write_text(json.dumps({"launches": launches, "cases": cases}, indent=1) + "\n")


def test_resolved_launch_values_are_those_captured():
    """The launch values for the shapes above, as captured (first from main at 382359f's
    untyped dict tables, to check the typed reader; last when the tensor-core GEMV path,
    MoeTiles.GMMA, was tuned): the file maps each case to its index in a list of the distinct
    launch values. A change of the reader or a table moves them only where meant."""
    from grok1.ops.tile_config import load_table

    load_table.cache_clear()
    captured = json.loads(RESOLVED.read_text())
    cases = all_cases()
    assert len(captured["cases"]) == len(cases)
    for op, device, args in cases:
        want = captured["launches"][captured["cases"][case_name(op, device, args)]]
        assert resolved_launch(op, device, args) == want, (op, device, args)


def test_tuned_moe_configs_fall_back_to_the_architecture_then_to_gemv_defaults():
    from grok1.ops.moe import moe_config
    from grok1.ops.tile_config import load_table

    load_table.cache_clear()
    # an H200 has no table of its own: it takes the sm_90 one (tuned on an H100)
    h200 = moe_config(2, 6144, 32768, 8, "int8", "NVIDIA_H200|sm_90")
    assert h200 == moe_config(2, 6144, 32768, 8, "int8", "NVIDIA_H100_80GB_HBM3|sm_90")
    assert h200.GEMV == 2
    # a 4-way shard's width, tuned at batch 1, 64 and 128: batch-1 decode takes the GEMV, 32
    # tokens (64 pairs, nearest the P = 2 entry) the grouped GEMMs (P > GEMV)
    assert moe_config(2, 6144, 8192, 8, "int8", "NVIDIA_H200|sm_90").GEMV == 2
    assert moe_config(64, 6144, 8192, 8, "int8", "NVIDIA_H200|sm_90").GEMV < 64
    # a width tuned at batch 1 only (8-way shards): 32 tokens take the decode defaults
    assert moe_config(64, 6144, 4096, 8, "int8", "NVIDIA_H200|sm_90").GEMV == 0


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


def test_shipped_tables_load_in_the_one_layout():
    from grok1.ops.tile_config import CONFIG_DIR, GemvTiles, MoeTiles, load_table

    load_table.cache_clear()
    moe = load_table(CONFIG_DIR / "moe.json")["sm_90"]
    assert sorted(moe) == [f"moe_D6144_F{F}_E8_{w}" for F in (16384, 32768, 4096, 8192)
                           for w in ("int4", "int8") if (F, w) != (4096, "int4")] + [
        "moe_D8192_F16384_E8_bf16"]  # Grok-2's experts, bf16 (bench/moe.py --model grok-2)
    assert moe["moe_D8192_F16384_E8_bf16"][2].GEMV == 0  # bf16 at P=2: the MMA path (97 %)
    assert sorted(moe["moe_D6144_F32768_E8_int8"]) == [2, 16, 128, 256, 2048]
    assert moe["moe_D6144_F32768_E8_int8"][2048] == MoeTiles(
        BM=128, BN1=128, BK1=64, W1=8, BN2=256, BK2=64, W2=8, S2=3, SPLIT=1, MAGIC=1)
    gemv = load_table(CONFIG_DIR / "linear.json")["sm_90"]
    assert gemv["gemv_K1536_N6144"] == {1: GemvTiles(BK=64, W=8, PROGRAMS=132)}
    assert all(list(by_rows) == [1] for by_rows in gemv.values())


def test_numerics_is_not_a_tile_key():
    """The numerics issue: a tuning table must not pick a numerics (the old LATE key chose the
    int8 products' rounding). What a kernel computes is a named argument at its call."""
    import dataclasses
    import inspect

    from grok1.ops.moe import fused_moe
    from grok1.ops.tile_config import FAMILIES

    for family in FAMILIES.values():
        assert "LATE" not in {f.name for f in dataclasses.fields(family)}
    assert inspect.signature(fused_moe).parameters["exact_int8_products"].default is False


BAD_ENTRIES = [  # (entry under sm_90, the message's tail after "<file>: ")
    ({"moe_D6144_F32768_E8_int8": {"2": {"BN1": 128, "LATE": 1}}},
     "sm_90/moe_D6144_F32768_E8_int8/2: unknown key 'LATE'=1 for MoeTiles"),
    ({"moe_D6144_F32768_E8_int8": {"16": {"BN1": 96}}},
     "sm_90/moe_D6144_F32768_E8_int8/16: BN1=96 must be a power of two"),
    ({"gemv_K6144_N6144": {"1": {"W": 3}}}, "sm_90/gemv_K6144_N6144/1: W=3 must be a power of two"),
    ({"gemv_K6144_N6144": {"1": {"W": 2.0}}}, "sm_90/gemv_K6144_N6144/1: W=2.0 must be an integer"),
    ({"gemv_K6144_N6144": {"1": {"W": True}}},
     "sm_90/gemv_K6144_N6144/1: W=True must be an integer"),
    ({"gemv_K6144_N6144": {"1": {"DEQUANT": 4}}},
     "sm_90/gemv_K6144_N6144/1: DEQUANT=4 must be one of [0, 1, 2, 3]"),
    ({"mm_K6144_N6144": {"64": {"SPLIT": 0}}}, "sm_90/mm_K6144_N6144/64: SPLIT=0 must be >= 1"),
    ({"mm_K6144_N6144": {"sixty": {"SPLIT": 2}}},
     "sm_90/mm_K6144_N6144/sixty: the rows key must be a positive integer"),
    ({"K6144_N6144": {"64": {"SPLIT": 2}}}, "sm_90/K6144_N6144: unknown kernel family"),
    ({"gemv_K6144_N6144": {"W": 2}},  # the old layout, without the rows level
     "sm_90/gemv_K6144_N6144/W: the rows key must be a positive integer (the layout: "
     "{device: {family_shape: {rows: {KEY: value}}}})"),
    ({"gemv_K6144_N6144": {"1": 2}}, "sm_90/gemv_K6144_N6144/1: expected an object of GemvTiles"),
]


@pytest.mark.parametrize("entries,message", BAD_ENTRIES)
def test_bad_table_entry_is_a_one_line_error_naming_file_entry_key_and_value(
        tmp_path, entries, message):
    from grok1.config import ConfigError
    from grok1.ops.tile_config import load_table

    path = tmp_path / "linear.json"
    path.write_text(json.dumps({"sm_90": entries}))
    with pytest.raises(ConfigError) as e:
        load_table(path)
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


def test_configs_given_at_the_call_are_validated_like_tables():
    import torch

    from grok1.config import ConfigError
    from grok1.ops.linear import quant_linear
    from grok1.ops.moe import fused_moe
    from grok1.ops.tile_config import GemvTiles, MoeTiles

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    w = torch.randint(-127, 128, (2, 64, 32), dtype=torch.int8, generator=g)
    s = torch.rand(2, 1, 32, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    with pytest.raises(ConfigError, match=r"^fused_moe\(config=...\): unknown key 'LATE'=1"):
        fused_moe(x, torch.rand(3, 2), ids, w, s, w, s, w.transpose(1, 2), s, {"LATE": 1})
    with pytest.raises(ConfigError, match=r"^quant_linear\(config=...\): BK=48 must be a power"):
        quant_linear(x, w[0], s[0], {"BK": 48})
    with pytest.raises(ConfigError, match=r"^MoeTiles: GBK2=24 must be a power of two"):
        MoeTiles(GBK2=24)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GemvTiles().W = 8
    assert MoeTiles.from_dict({"BM": 64}, "test") == MoeTiles(BM=64)


@pytest.mark.parametrize("group_k,groups,want,at_least,tile", [
    (768, 8, 128, 16, 128),  # Grok-1's 6144 rows in 8 scale groups: the whole tile fits
    (48, 8, 128, 16, 16),  # halved until it divides the group
    (40, 8, 128, 16, 0),  # no power of two >= 16 divides 40: the MMA kernels cannot tile it
    (40, 8, 32, 1, 8),  # the GEMVs go below 16
    (130, 1, 128, 16, 128)])  # one group: any tile (the last one is masked)
def test_k_tile_stays_inside_one_scale_group(group_k, groups, want, at_least, tile):
    from grok1.ops._triton import k_tile

    assert k_tile(group_k, groups, want, at_least) == tile


if __name__ == "__main__":
    capture()
