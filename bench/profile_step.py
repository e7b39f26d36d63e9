"""Where a decode step (batch 1 and 64) and a 1024-token prefill spend GPU time: torch.profiler's
kernel table over the eager forward (4 full-width layers, random weights: Grok-1's int8, or
with `grok-2` as the first argument Grok-2's bf16)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

import grok1
from bench.engine_bench import MODELS, _runner, _sequences, bench_config
from grok1.engine.scheduler import ScheduledChunk, Sequence

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "grok-1"
    model = grok1.random_weights(bench_config(4, name), quantized=MODELS[name][0], device="cuda")
    runner = _runner(model, 64, 1100)
    runner.use_graphs = False
    gen = torch.Generator().manual_seed(0)
    decode = _sequences(1, 512, runner.block_size, model.config.vocab_size, gen)
    seq = Sequence("p", torch.randint(3, 1000, (1024,), generator=gen).tolist(), 1024)
    seq.block_ids = list(range(1, 65))
    decode64 = _sequences(64, 512, runner.block_size, model.config.vocab_size, gen)
    for name, chunks in [("decode b=1", decode), ("decode b=64", decode64),
                         ("prefill 1024", [ScheduledChunk(seq, 0, 1024)])]:
        for _ in range(2):
            runner.execute(chunks)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.execute(chunks)
            torch.cuda.synchronize()
        print(f"== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
