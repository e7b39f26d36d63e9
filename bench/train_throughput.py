"""Training throughput of grok1's trainer: tokens/s and MFU of full optimizer steps.

    python bench/train_throughput.py                                        # 1 GPU
    torchrun --standalone --nproc-per-node 2 bench/train_throughput.py      # 2 GPUs, FSDP2

The default config is a ~111M-parameter Grok architecture (emb 768, 8 layers, 12 query / 2 kv
heads of 64, 8 experts top-2 of width 512, vocab 32768). Each step is Trainer.train_step(): the
forward of grok1.model.Grok1 (f32 master weights, bf16 matmuls where the reference has them),
cross-entropy + router losses, backward, grad clipping, AdamW. Random tokens (routing then stays
balanced). The same run measures the bf16 matmul ceiling (8192^3) beside the datasheet peak.
MFU counts 6 x active matmul parameters + attention (grok1.train.trainer.flops_per_token).
Writes bench/results/<gpu>/train_throughput_<N>gpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grok1.config import GrokConfig
from grok1.train.data import write_dataset
from grok1.train.train_config import TrainConfig
from grok1.train.trainer import Trainer, flops_per_token


def bench_config(layers: int) -> GrokConfig:
    return GrokConfig(vocab_size=32768, sequence_len=2048, emb_size=768, key_size=64,
                      num_q_heads=12, num_kv_heads=2, num_layers=layers, widening_factor=1.0,
                      embedding_multiplier_scale=math.sqrt(768), attn_output_multiplier=1 / 8)


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="datasheet bf16 dense peak")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_throughput needs a CUDA GPU")

    config = bench_config(args.layers)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
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
                      peak_tflops=args.peak_tflops, progress=False, tensorboard=False,
                      watchdog_s=0)
    trainer = Trainer(cfg)
    device = trainer.device
    measured = matmul_tflops(device)
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if trainer.train_step() is None:
            raise SystemExit(f"step {i} was skipped (non-finite loss)")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[args.warmup:])
    tok_s = trainer.tokens_per_step / step_s
    achieved_tflops = trainer.flops_per_step / step_s / 1e12 / world  # per GPU
    peak = trainer.peak_tflops
    total_params = sum(p.numel() for p in trainer.core.parameters())
    active = flops_per_token(config, 0) / 6
    gpu = torch.cuda.get_device_name(device)
    result = {
        "what": "train_throughput", "gpu": gpu, "num_gpus": world, "parallel": trainer.mode,
        "config": config.to_dict(), "params_total": total_params, "params_active": active,
        "batch_per_gpu": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": trainer.tokens_per_step, "step_ms": step_s * 1e3,
        "step_ms_all": [round(t * 1e3, 3) for t in times], "tok_s": tok_s,
        "tflops_per_gpu": achieved_tflops, "peak_tflops_spec": peak,
        "mfu_spec": achieved_tflops / peak if peak else None,
        "ceilings": {"bf16_matmul_8192_tflops": measured},
        "mfu_measured_ceiling": achieved_tflops / measured,
        "activation_checkpointing": args.activation_checkpointing,
        "dtype": "bf16 matmuls, f32 master weights and AdamW state",
        "torch": torch.__version__, "cuda": torch.version.cuda, "git_sha": git_sha(),
        "command": " ".join(([f"torchrun --nproc-per-node {world}"] if world > 1 else ["python"])
                            + sys.argv),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if rank == 0:
        spec = f"MFU {100 * result['mfu_spec']:.1f}% of {peak:.0f} TFLOP/s spec, " if peak else ""
        print(f"train {total_params / 1e6:.0f}M params ({active / 1e6:.0f}M active) L={args.layers}"
              f" {world}x {gpu}: step {step_s * 1e3:.1f} ms, {tok_s:,.0f} tok/s | "
              f"{achieved_tflops:.1f} TFLOP/s per GPU | {spec}"
              f"{100 * result['mfu_measured_ceiling']:.1f}% of measured {measured:.0f} TFLOP/s "
              f"bf16 matmul")
        out = args.out / gpu.replace(" ", "_")
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"train_throughput_{world}gpu.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    from grok1.parallel.mesh import shutdown

    shutdown(barrier=False)


if __name__ == "__main__":
    main()
