"""Targets for Nsight Compute: one fused_moe call per case (full-width Grok-1 experts, int8
and int4), each after its warm-up, between cudaProfilerStart/Stop, so that

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats --section SchedulerStats \\
        --section LaunchStats --section ComputeWorkloadAnalysis python3 bench/ncu_moe.py

reports each kernel of those calls once (bench/NOTES.md, session 7, has what it found)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.moe import random_experts
from grok1.ops.moe import fused_moe

E, D, F, A = 8, 6144, 32768, 2
CASES = [("int8", 64), ("int8", 1024), ("int4", 1), ("int8", 1), ("int4", 64)]


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    experts = {k: random_experts(k, E, D, F, g) for k in ("int8", "int4")}
    runs = []
    for weights, M in CASES:
        w, s, fmt = experts[weights]
        x = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16)
        gates, ids = torch.softmax(torch.randn(M, E, device="cuda", generator=g), -1).topk(A, -1)

        def call(x=x, gates=gates, ids=ids, w=w, s=s, fmt=fmt):
            fused_moe(x, gates, ids, w[0], s[0], w[1], s[1], w[2], s[2], weights=fmt)
        call(), call()  # compiles and settles outside the profiled range
        runs.append((weights, M, call))
    torch.cuda.synchronize()
    for weights, M, call in runs:
        print(f"== case {weights} M={M}", flush=True)
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
