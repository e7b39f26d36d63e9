"""Fused MoE alone at decode and prefill pair counts (full width: Grok-1's int8, or with --model
grok-2 its D = 8192 and bf16 weights; --weights int4|fp8 for the other formats): time per
launch config
(a staged sweep: GEMV vs MMA at M=1, the int8 conversion, prefill tiles),
beside its roofline (expert bytes / copy bandwidth, or FLOPs / bf16 rate). Writes the fastest
config per pair count as JSON in the grok1/ops/configs/moe.json format (--tuned-out; the
layout in grok1/ops/tile_config.py)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import measure_ceilings, staged_sweep, time_graph_ms, time_ms
from grok1.ops._triton import device_name
from grok1.ops.moe import fused_moe, moe_config
from grok1.ops.tile_config import CONFIG_DIR, moe_key
from grok1.quant import FP8, int4

# Stages per pair count, each a list of changes to the best config so far (tuned JSON first):
# one pair per expert (M=1): the GEMV kernels (grok1/ops/moe.py "GEMV") against the tuned MMA
# tiles, then how many ways the gate/up and down K ranges split (a tensor-parallel shard's
# narrow F needs the split to fill the SMs); other decode counts: the int8 -> f32 conversion
# (MAGIC); prefill: MAGIC, then tiles.
# Gate/up keeps two f32 accumulators: BM * BN1 <= 128 * 128 per 256 threads, or they spill.
GEMV_STAGES = [
    [{"GEMV": 0}] + [
        {"GEMV": 1 << 20, "GMMA": 0, "GBN1": a, "GBK1": b, "GW1": w, "GBN2": c, "GBK2": d,
         "GW2": w2, "MAGIC": 1} for a, b, w, c, d, w2 in [
            (128, 32, 4, 128, 32, 4), (256, 16, 4, 256, 16, 4), (64, 64, 4, 64, 64, 4),
            (128, 64, 8, 128, 64, 8), (256, 32, 8, 64, 32, 4), (64, 32, 2, 64, 32, 2)]] + [
        # the GEMV contract on the tensor cores (MoeTiles.GMMA)
        {"GEMV": 1 << 20, "GMMA": 1, "GBN1": a, "GBK1": b, "GW1": w, "GS1": st, "GBN2": c,
         "GBK2": d, "GW2": w, "GS2": st, "MAGIC": 1} for a, b, w, st, c, d in [
            (128, 64, 4, 4, 128, 64), (128, 128, 4, 3, 128, 128), (256, 64, 8, 4, 256, 64),
            (64, 128, 4, 4, 64, 128)]],
    # the gate/up and the down tiles apart (the first stage moves them together)
    [{"GBN1": a, "GBK1": b, "GW1": w} for a, b, w in [
        (256, 64, 8), (256, 32, 4), (128, 128, 4), (512, 32, 8), (128, 64, 8)]],
    [{"GBN2": a, "GBK2": b, "GW2": w} for a, b, w in [
        (256, 64, 8), (256, 64, 4), (256, 32, 4), (128, 128, 4), (512, 32, 8), (128, 64, 8),
        (64, 128, 4)]],
    [{"GSPLIT1": s} for s in (1, 2, 4, 8)],
    [{"GSPLIT": s} for s in (2, 4, 8)],
    [{"GS1": s, "GS2": s} for s in (1, 2, 4)]]
DECODE_STAGES = [
    [{"MAGIC": 0}, {"MAGIC": 1}],
    [{"BM": m} for m in (16, 32, 64)],
    [{"BN1": a, "BK1": b, "W1": w, "S1": st} for a, b, w, st in [
        (64, 128, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3)]],
    [{"BN2": a, "BK2": b, "W2": w, "S2": st} for a, b, w, st in [
        (64, 128, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3), (64, 64, 4, 4)]],
    [{"SPLIT": s} for s in (1, 2, 4, 8)]]
# 64 < P <= 512 (batch 33-256 decode): the grouped GEMMs at a few pairs per expert are
# latency-bound with one 8-warp block per SM (ncu: 144-255 registers a thread and 233 KB of
# shared memory at 64 x 128 x 64, 3-4 stages; bench/NOTES.md), so the stages offer smaller
# footprints (4 warps, fewer stages, narrower tiles) that let two or more blocks share an SM.
MID_STAGES = [
    [{"BM": m} for m in (16, 32, 64)],
    [{"BN1": a, "BK1": b, "W1": w, "S1": st} for a, b, w, st in [
        (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 4),
        (128, 128, 8, 3), (256, 64, 8, 3)]],
    [{"BN2": a, "BK2": b, "W2": w, "S2": st} for a, b, w, st in [
        (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3),
        (256, 64, 8, 3)]],
    [{"SPLIT": s} for s in (1, 2, 4)]]
PREFILL_STAGES = [
    [{"MAGIC": 0}, {"MAGIC": 1}],
    [{"BM": m, "BN1": a, "BK1": b, "W1": w, "S1": st} for m, a, b, w, st in [
        (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3)]],
    [{"BN2": a, "BK2": b, "W2": w, "S2": st} for a, b, w, st in [
        (128, 128, 8, 3), (256, 64, 8, 3)]]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 1024])
    p.add_argument("--model", choices=["grok-1", "grok-2"], default="grok-1",
                   help="grok-1: D 6144, int8 weights; grok-2: D 8192, bf16 weights")
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="expert width F per rank: Grok-1's 32768 whole (Grok-2's 16384), "
                        "halved per doubling of the MoE's tensor-parallel shards")
    p.add_argument("--weights", choices=["int8", "int4", "fp8", "bf16"], default=None,
                   help="the experts' format (default: the model's release, grok-1 int8, "
                        "grok-2 bf16); int4 in groups of 128 inputs")
    p.add_argument("--tuned-out", type=Path, default=None)
    p.add_argument("--key", choices=["arch", "exact"], default="arch",
                   help="file the configs under the architecture (sm_90: every Hopper card "
                        "falls back to them) or this card's exact name (overrides it)")
    args = p.parse_args()
    ceil = measure_ceilings()
    table = json.loads((CONFIG_DIR / "moe.json").read_text())  # keep pair counts not swept
    D, release, width = (6144, "int8", 32768) if args.model == "grok-1" else (8192, "bf16", 16384)
    for F in args.widths or [width]:
        sweep_width(args.tokens, F, ceil, table, 1 if args.key == "arch" else 0, D,
                    args.weights or release)
    if args.tuned_out:
        args.tuned_out.write_text(json.dumps(table, indent=1) + "\n")


# bytes per weight as stored (int4: two per byte; its scales, one per 128 inputs, left out)
BYTES = {"int8": 1, "int4": 0.5, "fp8": 1, "bf16": 2}


def random_experts(weights: str, E: int, D: int, F: int, g: torch.Generator):
    """Random gate, up and down weights [E, in, out] stored as `weights`, their scales (None
    for bf16) and format: uniform int8 or int4 codes, normal fp8 or bf16."""
    shapes = [(E, D, F), (E, D, F), (E, F, D)]
    fmt = {"int8": None, "int4": int4(), "fp8": FP8, "bf16": None}[weights]
    if weights == "bf16":
        w = [(torch.randn(sh, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
             for sh in shapes]
        return w, [None, None, None], None
    if weights == "int8":
        w = [torch.randint(-127, 128, sh, dtype=torch.int8, device="cuda", generator=g)
             for sh in shapes]
        groups = [1, 1, 8]
    elif weights == "int4":  # two codes per byte along the input dim
        w = [torch.randint(0, 256, (e, k // 2, n), dtype=torch.uint8, device="cuda",
                           generator=g) for e, k, n in shapes]
        groups = [D // 128, D // 128, F // 128]
    else:
        w = [(torch.randn(sh, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
             for sh in shapes]
        groups = [1, 1, 1]
    s = [torch.rand((e, G, n), device="cuda", generator=g).to(torch.bfloat16) * 1e-4
         for (e, _, n), G in zip(shapes, groups)]
    return w, s, fmt


def sweep_width(tokens: list[int], F: int, ceil: dict, table: dict, key_part: int,
                D: int = 6144, weights: str = "int8") -> None:
    E, A = 8, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    w, s, fmt = random_experts(weights, E, D, F, g)
    tuned = {}
    for M in tokens:
        x = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16)
        logits = torch.randn(M, E, device="cuda", generator=g)
        gates, ids = torch.softmax(logits, -1).topk(A, -1)
        experts = ids.unique().numel()
        nbytes = experts * 3 * D * F * BYTES[weights]
        roof = max(nbytes / ceil["copy_gbps"] / 1e6, 2 * M * A * 3 * D * F / ceil["bf16_tflops"] / 1e9)
        P = M * A
        base = {k: v for k, v in moe_config(P, D, F, E, weights, device_name(x)).as_dict().items()
                if k != "GEMV"}
        fn_timer = (lambda fn: time_graph_ms(fn, calls=10)) if P <= 64 else (lambda fn: time_ms(fn, reps=20))
        # the GEMV stage's placeholder "GEMV": 1 << 20 becomes this pair count (0 stays off)
        stages = [[{**c, "GEMV": P} if c.get("GEMV") else c for c in st]
                  for st in (GEMV_STAGES if M == 1 else DECODE_STAGES if P <= 64
                             else MID_STAGES if P <= 512 else PREFILL_STAGES)]
        if weights == "int4" and M > 1:  # how the grouped GEMMs read int4 bytes (MoeTiles.I4PAIR)
            stages = [[{"I4PAIR": 0}, {"I4PAIR": 1}]] + stages

        def measure(cfg, x=x, gates=gates, ids=ids, timer=fn_timer, M=M, experts=experts,
                    roof=roof):
            ms = timer(lambda: fused_moe(x, gates, ids, w[0], s[0], w[1], s[1], w[2], s[2], cfg,
                                         weights=fmt))
            print(f"moe F={F} M={M} experts={experts} {cfg}: {ms:.3f} ms | roofline "
                  f"{roof:.3f} ms ({100 * roof / ms:.0f}%)", flush=True)
            return ms
        best = staged_sweep(base, stages, measure)
        if best:
            tuned[str(M * A)] = {k: v for k, v in best[1].items() if k != "GEMV" or v}
    for P, cfg in tuned.items():
        print(f"best F={F} P={P}: {cfg}")
    key = moe_key(D, F, E, weights)
    table.setdefault(device_name(x).split("|")[key_part], {}).setdefault(key, {}).update(tuned)


if __name__ == "__main__":
    main()
