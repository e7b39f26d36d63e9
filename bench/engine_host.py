"""Host time per engine decode step: what `Engine.step()` costs besides the model's forward
(scheduling, the runner's step inputs, sampling, bookkeeping), at batch 1, 32 and 128.

    python bench/engine_host.py [--batch 1 32 128] [--mode greedy sampled seeded extras]

On CPU with a tiny random model (grok1.random_weights): on a GPU the forward is a CUDA-graph
replay and the rest is what leaves the GPU idle between steps (issue 14: 15.6 ms a step for
11.6 ms of GPU work at batch 128 on one H100). The runner's `forward` (the work a graph replays)
is replaced by random logits of its shape [R, V]: the CPU twins' attention would take seconds a
step and tell nothing about the host, and sampling does not care where its logits came from.
Each step is timed whole and its forward apart; host = step - forward. On CPU the sampling ops
compute on [B, V] logits as well (V = 256 here, so they stay small). Sampling modes: greedy;
sampled (T 0.8, top-k 40, top-p 0.9, no seed); seeded (the same with a seed per request: the
per-row generator path); extras (T 0.8, min-p, repetition, presence and frequency penalties).
Prints one line per figure and writes bench/results/cpu/engine_host_<time>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a checkout without an install

import torch

import grok1
from bench._common import git_sha, write_results
from bench.load_speed import cpu_name
from grok1.config import GrokConfig
from grok1.engine.llm import Engine
from grok1.sampling import SamplingParams

MODES = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.8, top_k=40, top_p=0.9),
    "seeded": dict(temperature=0.8, top_k=40, top_p=0.9, seed=0),
    "extras": dict(temperature=0.8, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
                   frequency_penalty=0.1),
}


class Timed:
    """Wraps a bound method, adding its wall time (s) to `total` on each call."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0


def measure(model, batch: int, mode: str, context: int, steps: int, warmup: int) -> dict:
    """Median per-step figures (ms) over `steps` decode steps of `batch` requests."""
    max_len = context + 128
    engine = Engine(model, max_batch_size=batch, block_size=16, max_model_len=max_len,
                    num_blocks=batch * -(-max_len // 16), max_num_batched_tokens=max(2048, batch),
                    use_cuda_graphs=False)
    gen = torch.Generator().manual_seed(batch)
    V = model.config.vocab_size
    # the forward's stand-in: logits for the batch's logit rows (see the module docstring)
    engine.runner.forward = lambda b: torch.randn(b.logit_rows_R.shape[0], V, generator=gen)
    for r in range(batch):
        params = dict(MODES[mode])
        if "seed" in params:
            params["seed"] = r
        prompt = torch.randint(3, V, (context,), generator=gen).tolist()
        # requests admitted first decode while the later ones prefill: room for both phases
        engine.add_request(f"r{r}", prompt, SamplingParams(
            max_tokens=127, ignore_eos=True, **params))
    while any(s.num_uncomputed > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # the prefills
    runner, sched = engine.runner, engine.scheduler
    timers = {"schedule": Timed(sched.schedule), "prepare": Timed(runner.prepare),
              "forward": Timed(runner.forward)}
    sched.schedule, runner.prepare, runner.forward = (timers["schedule"], timers["prepare"],
                                                      timers["forward"])
    rows = {k: [] for k in ("step", *timers)}
    for i in range(warmup + steps):
        before = {k: t.total for k, t in timers.items()}
        t0 = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - t0
        assert len(outs) == batch and all(len(o.new_token_ids) == 1 for o in outs), \
            "every request decodes one token a step"
        if i >= warmup:
            rows["step"].append(elapsed)
            for k, t in timers.items():
                rows[k].append(t.total - before[k])
    host = [s - f for s, f in zip(rows["step"], rows["forward"])]
    ms = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in rows.items()}
    sample = [h - s - p for h, s, p in zip(host, rows["schedule"], rows["prepare"])]
    return {"batch": batch, "mode": mode, "context": context, "steps": steps,
            "host_ms": 1e3 * statistics.median(host), **ms,
            "sample_and_bookkeeping_ms": 1e3 * statistics.median(sample)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--mode", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps (median; with "
                    "--warmup and the prefill steps under the 127 tokens each request may make)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--label", default="", help="added to the file name (e.g. before)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu")
    args = ap.parse_args()
    # one thread, as the engine's host thread is: OpenMP's workers spin against whatever else
    # holds the cores (a [32, 256] softmax took 8 ms on two shared cores, 0.02 ms on one thread)
    torch.set_num_threads(1)
    config = GrokConfig.preset("tiny").replace(sequence_len=args.context + 128)
    model = grok1.random_weights(config, quantized=True, device="cpu")
    env = {"what": "engine_host", "device": "cpu", "cpu": cpu_name(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "config": "tiny",
           "load_avg_at_start": os.getloadavg(), "torch": torch.__version__,
           "python": platform.python_version(), "git_sha": git_sha(),
           "command": " ".join(sys.argv),
           "timestamp": datetime.datetime.now(datetime.UTC).isoformat()}
    results = []
    for batch in args.batch:
        for mode in args.mode:
            r = {**measure(model, batch, mode, args.context, args.steps, args.warmup), **env}
            results.append(r)
            print(f"b={batch:<4} {mode:<8} host {r['host_ms']:7.3f} ms/step (schedule "
                  f"{r['schedule_ms']:.3f}, prepare {r['prepare_ms']:.3f}, sample + rest "
                  f"{r['sample_and_bookkeeping_ms']:.3f}) | forward {r['forward_ms']:.3f} ms",
                  flush=True)
    prefix = "engine_host" + (f"_{args.label}" if args.label else "")
    path = write_results(results, args.out, prefix=prefix)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
