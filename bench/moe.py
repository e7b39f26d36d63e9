"""Fused MoE alone at decode and prefill pair counts (full width, int8): time per launch config,
beside its roofline (expert bytes / copy bandwidth, or FLOPs / bf16 rate). Writes the fastest
config per pair count as JSON in the grok1/ops/configs/moe.json format (--tuned-out)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from grok1.engine.bench_cli import measure_ceilings, time_ms
from grok1.ops._triton import device_name
from grok1.ops.moe import fused_moe, moe_config

DECODE = [{"BM": 16, "BN1": BN1, "BK1": BK1, "W1": 4, "S1": S1, "BN2": BN2, "BK2": BK2, "W2": 4, "S2": S2, "SPLIT": SP,
               "LATE": LATE}
          for BN1, BK1, S1 in [(128, 128, 4), (64, 128, 4), (128, 256, 3)]
          for BN2, BK2, S2, SP in [(64, 128, 4, 4), (64, 256, 4, 8)]
          for LATE in (0, 1)]
PREFILL = [{"BM": BM, "BN1": BN, "BK1": BK, "W1": W, "S1": S, "BN2": BN, "BK2": BK, "W2": W, "S2": S, "SPLIT": 1, "LATE": LATE}
           for BM, BN, BK, W, S in [(64, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3)]
           for LATE in (0, 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024])
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
        cands = DECODE if M * A <= 64 else PREFILL
        best = None
        for cfg in [None, *cands]:
            try:
                ms = time_ms(lambda x=x, gates=gates, ids=ids, cfg=cfg: fused_moe(
                    x, gates, ids, w[0], s[0], w[1], s[1], w[2], s[2], cfg), reps=20)
            except Exception as e:  # noqa: BLE001 (a config that does not fit shared memory is skipped)
                print(f"M={M} {cfg}: failed ({type(e).__name__})")
                continue
            print(f"moe M={M} experts={experts} {cfg or 'default'}: {ms:.3f} ms | roofline "
                  f"{roof:.3f} ms ({100 * roof / ms:.0f}%)", flush=True)
            if cfg is not None and (best is None or ms < best[0]):
                best = (ms, cfg)
        if best:
            tuned[str(M * A)] = best[1]
    print("default decode config:", moe_config(2, D, F, E, True, "x"))
    if args.tuned_out:
        key = f"D{D}_F{F}_E{E}_int8"
        args.tuned_out.write_text(json.dumps({device_name(x): {key: tuned}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
