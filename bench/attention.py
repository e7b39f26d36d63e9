"""Paged attention alone (grok1.ops.attention) at Grok-1's heads (48 query, 8 kv, 128): prefill
of 1024 and 4096 tokens and decode at batch 1 and 64, time per launch choice (query tokens per
program, keys per step, warps, stages) beside two bounds measured in the same run: the QK^T and
PV matmul FLOPs at the bf16 rate, and the K/V bytes at copy bandwidth. Writes every measurement
as JSON (--out). The launch choices change the instructions, never the numerics."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import environment, measure_ceilings, staged_sweep, time_graph_ms, time_ms
from grok1.ops.attention import paged_attention, plan_attention

N, KV, H, PAGE = 48, 8, 128, 16
CASES = {  # name: (query tokens per sequence, context per sequence, sequences)
    "prefill1024": (1024, 1024, 1), "prefill4096": (4096, 4096, 1),
    "decode_b1_ctx512": (1, 512, 1), "decode_b1_ctx4096": (1, 4096, 1),
    "decode_b64_ctx512": (1, 512, 64)}
PREFILL_STAGES = [
    [{"block_t": t} for t in (4, 8, 16)],
    [{"BLOCK_S": s, "W": w} for s, w in [(16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]],
    [{"S": s} for s in (1, 2, 3)]]
DECODE_STAGES = [
    [{"BLOCK_S": s, "W": w} for s, w in [(32, 4), (64, 4), (64, 2), (128, 4), (128, 8)]],
    [{"S": s} for s in (1, 2, 3)], [{"splits": s} for s in (None, 4, 8, 16, 32)]]


def build(q_len: int, ctx: int, seqs: int, gen: torch.Generator):
    pages = -(-ctx // PAGE)
    kc = torch.randn(seqs * pages + 1, PAGE, KV, H, device="cuda", generator=gen).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    table = (torch.randperm(seqs * pages, device="cuda", generator=gen) + 1).int().view(seqs, pages)
    q = (torch.randn(seqs * q_len, N, H, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    pos = torch.arange(ctx - q_len, ctx, device="cuda").repeat(seqs)
    return q, kc, vc, table, pos, [i * q_len for i in range(seqs + 1)]


def bounds_ms(q_len: int, ctx: int, seqs: int, ceil: dict) -> tuple[float, float]:
    visible = sum(ctx - q_len + 1 + i for i in range(q_len))  # keys each query sees
    flops = 4 * N * H * visible * seqs
    kv_bytes = 2 * KV * H * 2 * ctx * seqs
    return flops / ceil["bf16_tflops"] / 1e9, kv_bytes / ceil["copy_gbps"] / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    ceil = measure_ceilings()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.cases:
        q_len, ctx, seqs = CASES[name]
        q, kc, vc, table, pos, qs = build(q_len, ctx, seqs, gen)
        flops_ms, bytes_ms = bounds_ms(q_len, ctx, seqs, ceil)
        decode = q_len == 1

        def measure(cfg, name=name, q=q, kc=kc, vc=vc, table=table, pos=pos, qs=qs, ctx=ctx,
                    flops_ms=flops_ms, bytes_ms=bytes_ms, decode=decode):
            cfg = dict(cfg)
            plan = plan_attention(qs, KV, N // KV, "cuda", max_kv_len=ctx,
                                  splits=cfg.pop("splits", None), block_t=cfg.pop("block_t", None))
            def fn():
                return paged_attention(q, kc, vc, table, pos, plan, 0.0883883, tiles=cfg)
            ms = time_graph_ms(fn) if decode else time_ms(fn, reps=10)
            bound = max(flops_ms, bytes_ms)
            print(f"{name} {cfg} splits={plan.splits} block_t={plan.block_t}: {1e3 * ms:.1f} us"
                  f" | bound {1e3 * bound:.1f} us ({100 * bound / ms:.0f}%)", flush=True)
            rows.append({"case": name, "config": cfg, "splits": plan.splits,
                         "block_t": plan.block_t, "us": 1e3 * ms, "flops_bound_us": 1e3 * flops_ms,
                         "bytes_bound_us": 1e3 * bytes_ms, "pct_of_bound": 100 * bound / ms})
            return ms
        defaults = {}
        measure(defaults)  # today's launch first: the figure to beat
        best = staged_sweep(defaults, DECODE_STAGES if decode else PREFILL_STAGES, measure)
        if best:
            print(f"best {name}: {1e3 * best[0]:.1f} us {best[1]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({**environment(), "ceilings": ceil, "rows": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
