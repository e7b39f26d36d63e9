"""Training throughput of grok1's trainer: tokens/s, MFU and peak memory of full optimizer steps.

    python bench/train_throughput.py                                        # 1 GPU
    torchrun --standalone --nproc-per-node 2 bench/train_throughput.py      # 2 GPUs, FSDP2
    torchrun --standalone --nproc-per-node 2 bench/train_throughput.py --parallel ddp --compile
    python bench/train_throughput.py --attention flex                       # flex_attention
    python bench/train_throughput.py --model bench-111m --expert-down f32   # the 2026-11-27 run's
    python bench/train_throughput.py --cpu-only                             # the CPU figure only

The default model is the `train-1b` preset: 1.02B parameters (0.34B active), emb 1536, 12 layers,
12 query / 2 kv heads of 128, 8 experts top-2 of width 2048, vocab 32768 (grok1/config.py).
Each step is Trainer.train_step(): the forward of grok1.model.Grok1 (f32 master weights, bf16
matmuls where the reference has them; the MoE's pairs grouped by expert on the device, grouped
matmuls: grok1.model.moe_ref), cross-entropy + router losses, backward, grad clipping, AdamW.
`--expert-down` picks the experts' down-projection numerics: bf16 (default here: its matmuls on
the tensor cores, no host sync) or f32 (the reference's: f32 matmuls, and torch._grouped_mm's
fallback reads the group ends on the host). Random tokens (routing then stays balanced).

MFU counts 6 x active matmul parameters + attention (grok1.train.trainer.flops_per_token), per
GPU, against the bf16 matmul rate this run measures (8192^3; bench/_common.measure_ceilings),
and against the datasheet peak where the GPU is known. Peak memory is torch's allocator peak
over the timed steps. A CPU figure rides along, labeled as such: one MoE layer's forward and
backward, expert by expert (the loop training ran before) against the grouped path.
Writes bench/results/<gpu>/train_throughput_<N>gpu.json, or _<N>gpu_flex.json with
`--attention flex` (torch's flex_attention in place of the reference's attention:
grok1.model.attention_flex); --cpu-only: bench/results/cpu/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import git_sha, measure_ceilings
from grok1.config import GrokConfig
from grok1.model import ATTENTION_KERNELS, EXPERT_DOWN, MoE, moe_ref, route
from grok1.moe_dispatch import default_backend
from grok1.train.data import write_dataset
from grok1.train.train_config import TrainConfig
from grok1.train.trainer import Trainer, flops_per_token

# The 112M-parameter config of the first measurement (bench/results/NVIDIA_H200/, 2026-11-27)
BENCH_111M = GrokConfig(vocab_size=32768, sequence_len=2048, emb_size=768, key_size=64,
                        num_q_heads=12, num_kv_heads=2, num_layers=8, widening_factor=1.0,
                        embedding_multiplier_scale=math.sqrt(768), attn_output_multiplier=1 / 8)


def bench_config(model: str, layers: int | None) -> GrokConfig:
    config = BENCH_111M if model == "bench-111m" else GrokConfig.resolve(model)
    return config.replace(num_layers=layers) if layers else config


def cpu_moe_comparison(tokens: int = 512, reps: int = 7) -> dict:
    """Milliseconds of one MoE layer's forward + backward on the CPU (emb 256, width 512, 8
    experts top-2, bf16 activations, f32 master weights): expert by expert ("loop", as training
    ran before the grouped path) against grouped (the CPU's per-segment backend) and padded."""
    config = GrokConfig.preset("tiny").replace(emb_size=256, widening_factor=3.0)
    g = torch.Generator().manual_seed(0)
    moe = MoE(config, None, torch.float32)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(tokens, config.emb_size, generator=g).to(torch.bfloat16)

    def step(backend: str | None) -> None:
        xg = x.detach().requires_grad_()
        _, gates, ids = route(xg, moe.router, moe.top_k)
        out = moe_ref(xg, gates, ids, moe.w_gate, moe.w_up, moe.w_down, backend=backend)
        out.float().sum().backward()

    result = {"what": "CPU sanity figure, not a GPU one: one MoE layer forward + backward",
              "tokens": tokens, "emb_size": config.emb_size, "expert_width": config.ffn_size,
              "experts": config.num_experts, "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "reps": reps}
    backends = {"loop": "loop", "grouped": None, "padded": "padded"}
    times: dict[str, list[float]] = {name: [] for name in backends}
    for rep in range(reps + 1):  # interleaved, so that a change in the machine's load hits all
        for name, backend in backends.items():
            t0 = time.perf_counter()
            step(backend)
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    result["ms"] = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
    return result


def grouped_mm_backends(config: GrokConfig, device: torch.device) -> dict[str, str]:
    """The grouped matmul backend the MoE's projections take here, by operand dtype (bf16:
    gate/up, and down with --expert-down bf16; f32: down with f32)."""
    D, F, E = config.emb_size, config.ffn_size, config.num_experts
    return {str(dt).removeprefix("torch."): default_backend(
        torch.empty(16, F, dtype=dt, device=device), torch.empty(E, F, D, dtype=dt, device=device))
        for dt in (torch.bfloat16, torch.float32)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="train-1b",
                   help="a preset, a config.json, or bench-111m (the first measurement's)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--expert-down", choices=EXPERT_DOWN, default="bf16",
                   help="the experts' down-projection numerics (grok1.model.moe_ref)")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="plain",
                   help="the attention's kernel (grok1.model): plain (the reference's "
                        "rounding, [B, N, T, T] f32 scores) or flex (torch's flex_attention)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--parallel", choices=["auto", "fsdp", "ddp"], default="auto",
                   help="several GPUs: FSDP2 (auto) or DDP (a model that fits one GPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="datasheet bf16 dense peak")
    p.add_argument("--cpu-only", action="store_true", help="only the CPU MoE comparison")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if args.cpu_only or not torch.cuda.is_available():
        if not args.cpu_only:
            raise SystemExit("train_throughput needs a CUDA GPU (--cpu-only: the CPU figure)")
        cpu = cpu_moe_comparison()
        result = {"what": "train_moe_cpu", "cpu_moe_fwd_bwd": cpu, "torch": torch.__version__,
                  "git_sha": git_sha(), "command": " ".join(["python"] + sys.argv),
                  "timestamp": stamp}
        print(f"CPU, one MoE layer fwd+bwd ({cpu['tokens']} tokens): {cpu['ms']} ms")
        out = args.out / "cpu"
        out.mkdir(parents=True, exist_ok=True)
        path = out / "train_moe_cpu.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
        return

    config = bench_config(args.model, args.layers)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # each rank measures its own GPU's ceilings
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    ceilings = measure_ceilings()  # before the model takes the memory
    tmp = Path(tempfile.mkdtemp(prefix=f"grok1-bench-{rank}-"))
    config.save_json(tmp / "config.json")
    g = torch.Generator().manual_seed(0)  # the same random tokens on every rank
    need = 4 * world * args.batch_size * (args.seq_len + 1)
    tokens = torch.randint(3, config.vocab_size, (need,), generator=g).tolist()
    write_dataset(tmp / "data", [("random", tokens)], config.vocab_size, val_fraction=0.0)
    cfg = TrainConfig(data_dir=str(tmp / "data"), out_dir=str(tmp / "run"),
                      model=str(tmp / "config.json"), batch_size=args.batch_size,
                      seq_len=args.seq_len, max_steps=10**9, warmup_steps=10,
                      activation_checkpointing=args.activation_checkpointing,
                      compile=args.compile, expert_down=args.expert_down,
                      attention=args.attention, parallel=args.parallel,
                      peak_tflops=args.peak_tflops, progress=False, tensorboard=False,
                      watchdog_s=0)
    trainer = Trainer(cfg)
    device = trainer.device
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if trainer.train_step() is None:
            raise SystemExit(f"step {i} was skipped (non-finite loss)")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[args.warmup:])
    tok_s = trainer.tokens_per_step / step_s
    achieved_tflops = trainer.flops_per_step / step_s / 1e12 / world  # per GPU
    measured = ceilings["bf16_tflops"]
    peak = trainer.peak_tflops
    total_params = sum(p.numel() for p in trainer.core.parameters())  # DTensors: global numel
    active = flops_per_token(config, 0) / 6
    gpu = torch.cuda.get_device_name(device)
    result = {
        "what": "train_throughput", "gpu": gpu, "num_gpus": world, "parallel": trainer.mode,
        "model": args.model, "config": config.to_dict(), "params_total": total_params,
        "params_active": active, "batch_per_gpu": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": trainer.tokens_per_step, "step_ms": step_s * 1e3,
        "step_ms_all": [round(t * 1e3, 3) for t in times], "tok_s": tok_s,
        "tok_s_per_gpu": tok_s / world, "tflops_per_gpu": achieved_tflops,
        "mfu": achieved_tflops / measured, "ceilings": ceilings,
        "peak_tflops_spec": peak, "mfu_spec": achieved_tflops / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "expert_down": args.expert_down, "attention": args.attention, "compile": args.compile,
        "moe_grouped_mm": grouped_mm_backends(config, device),
        "activation_checkpointing": args.activation_checkpointing,
        "dtype": "bf16 matmuls, f32 master weights and AdamW state",
        "torch": torch.__version__, "cuda": torch.version.cuda, "git_sha": git_sha(),
        "command": " ".join(([f"torchrun --nproc-per-node {world}"] if world > 1 else ["python"])
                            + sys.argv),
        "timestamp": stamp,
    }
    if rank == 0:
        result["cpu_moe_fwd_bwd"] = cpu_moe_comparison()
        spec = f"MFU {100 * result['mfu_spec']:.1f}% of {peak:.0f} TFLOP/s spec, " if peak else ""
        print(f"train {total_params / 1e6:.0f}M params ({active / 1e6:.0f}M active) "
              f"L={config.num_layers} {world}x {gpu}: step {step_s * 1e3:.1f} ms, "
              f"{tok_s:,.0f} tok/s ({tok_s / world:,.0f} per GPU) | {achieved_tflops:.1f} TFLOP/s"
              f" per GPU | MFU {100 * result['mfu']:.1f}% of measured {measured:.0f} TFLOP/s "
              f"bf16 matmul | {spec}peak memory {result['peak_memory_gib']:.1f} GiB | "
              f"expert_down {args.expert_down}, attention {args.attention}, "
              f"compile {args.compile}")
        print(f"CPU sanity, one MoE layer fwd+bwd: {result['cpu_moe_fwd_bwd']['ms']} ms")
        out = args.out / gpu.replace(" ", "_")
        out.mkdir(parents=True, exist_ok=True)
        kernel = "" if args.attention == "plain" else f"_{args.attention}"  # runs side by side
        path = out / f"train_throughput_{world}gpu{kernel}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    from grok1.parallel.mesh import shutdown

    shutdown(barrier=False)


if __name__ == "__main__":
    main()
