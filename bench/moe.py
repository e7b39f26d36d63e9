"""Fused MoE alone at decode and prefill pair counts (full width, int8): time per launch config
(a two-stage sweep: gate/up tiles, then down tiles),
beside its roofline (expert bytes / copy bandwidth, or FLOPs / bf16 rate). Writes the fastest
config per pair count as JSON in the grok1/ops/configs/moe.json format (--tuned-out)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from grok1.engine.bench_cli import measure_ceilings, time_ms
from grok1.ops._triton import CONFIG_DIR, device_name
from grok1.ops.moe import fused_moe, moe_config

# Two stages per pair count: the gate/up tiles with the down tiles fixed, then the down tiles
# with the best gate/up. Gate/up keeps two f32 accumulators: BM * BN1 <= 128 * 128 per 256
# threads, or they spill.
DECODE_BASE = {"BM": 16, "BN1": 128, "BK1": 128, "W1": 4, "S1": 4, "BN2": 64, "BK2": 128,
               "W2": 4, "S2": 4, "SPLIT": 4, "LATE": 1}
DECODE_GATE_UP = [{"BN1": a, "BK1": b, "W1": w, "S1": st} for a, b, w, st in [
    (128, 128, 4, 4), (128, 128, 8, 4), (64, 256, 4, 4), (128, 256, 8, 3), (64, 128, 4, 6),
    (256, 128, 8, 3)]]
DECODE_DOWN = [{"BN2": a, "BK2": b, "W2": w, "S2": st, "SPLIT": sp} for a, b, w, st, sp in [
    (64, 128, 4, 4, 4), (64, 256, 8, 4, 8), (128, 128, 8, 4, 4), (64, 128, 4, 6, 8),
    (32, 256, 4, 4, 4)]]
PREFILL_BASE = {"BM": 128, "BN1": 128, "BK1": 64, "W1": 8, "S1": 3, "BN2": 128, "BK2": 64,
                "W2": 8, "S2": 3, "SPLIT": 1, "LATE": 1}
PREFILL_GATE_UP = [{"BM": m, "BN1": a, "BK1": b, "W1": w, "S1": st} for m, a, b, w, st in [
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3),
    (64, 128, 64, 8, 4)]]
PREFILL_DOWN = [{"BN2": a, "BK2": b, "W2": w, "S2": st} for a, b, w, st in [
    (128, 64, 8, 3), (256, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 4)]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 1024])
    p.add_argument("--tuned-out", type=Path, default=None)
    args = p.parse_args()
    ceil = measure_ceilings()
    D, F, E, A = 6144, 32768, 8, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    w = [torch.randint(-127, 128, s, dtype=torch.int8, device="cuda", generator=g)
         for s in [(E, D, F), (E, D, F), (E, F, D)]]
    s = [torch.rand(sh, device="cuda", generator=g).to(torch.bfloat16) * 1e-4
         for sh in [(E, 1, F), (E, 1, F), (E, 8, D)]]
    tuned = {}
    for M in args.tokens:
        x = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16)
        logits = torch.randn(M, E, device="cuda", generator=g)
        gates, ids = torch.softmax(logits, -1).topk(A, -1)
        experts = ids.unique().numel()
        nbytes = experts * 3 * D * F
        roof = max(nbytes / ceil["copy_gbps"] / 1e6, 2 * M * A * 3 * D * F / ceil["bf16_tflops"] / 1e9)
        decode = M * A <= 64
        base = dict(DECODE_BASE if decode else PREFILL_BASE)
        stages = [DECODE_GATE_UP, DECODE_DOWN] if decode else [PREFILL_GATE_UP, PREFILL_DOWN]
        best = None
        for stage in stages:
            for change in stage:
                cfg = {**base, **change}
                try:
                    ms = time_ms(lambda x=x, gates=gates, ids=ids, cfg=cfg: fused_moe(
                        x, gates, ids, w[0], s[0], w[1], s[1], w[2], s[2], cfg), reps=20)
                except Exception as e:  # noqa: BLE001 (a config that does not fit is skipped)
                    print(f"M={M} {cfg}: failed ({type(e).__name__})")
                    continue
                print(f"moe M={M} experts={experts} {cfg}: {ms:.3f} ms | roofline "
                      f"{roof:.3f} ms ({100 * roof / ms:.0f}%)", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best:
                base = dict(best[1])
        if best:
            tuned[str(M * A)] = best[1]
    print("default decode config:", moe_config(2, D, F, E, True, "x"))
    if args.tuned_out:
        key = f"D{D}_F{F}_E{E}_int8"
        table = json.loads((CONFIG_DIR / "moe.json").read_text())  # keep pair counts not swept
        table.setdefault(device_name(x), {}).setdefault(key, {}).update(tuned)
        args.tuned_out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
