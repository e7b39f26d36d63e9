"""LoRA on full-width Grok-1 layers with int8 base weights on one GPU (issue 18's measurement),
through `grok1 finetune`'s own parts: grok1.lora.apply_lora over random int8 weights in the
release's form (grok1.random_weights; no real checkpoint fits the device's disk), the Trainer
with per-layer activation checkpointing (what grok1.info.lora_memory_plan assumes), on real
English text tokenized with Grok-1's tokenizer (this checkout's README and notes and the Python
standard library's module docstrings, as JSONL through grok1.train.finetune.prepare_data, 10 %
held out). Prints and writes (JSON) the held-out loss before and after, tokens/s, and the peak
GPU memory beside the plan.

    python bench/lora_finetune.py --tokenizer ../shared/grok1/tokenizer.model   # 8 layers, r 16
    python bench/lora_finetune.py --tokenizer T --layers 2 --device cpu --model tiny  # a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a checkout without an install

import torch

from bench._common import environment, write_results
from grok1.config import GrokConfig
from grok1.info import lora_memory_plan
from grok1.lora import TARGETS, LoraConfig, apply_lora
from grok1.loading import random_weights
from grok1.tokenizer import Tokenizer
from grok1.train.finetune import prepare_data
from grok1.train.train_config import TrainConfig
from grok1.train.trainer import Trainer

STDLIB_PROSE = ("argparse", "json", "csv", "cmd", "statistics", "unittest", "heapq", "doctest",
                "sched", "sqlite3", "ftplib", "pydoc", "difflib", "collections")


def write_jsonl(path: Path, chunk_chars: int = 2000) -> None:
    """Real English text as JSONL {"text": ...} records of about chunk_chars characters."""
    parts = [(REPO / "README.md").read_text(), (REPO / "bench" / "NOTES.md").read_text()]
    parts += [importlib.import_module(m).__doc__ or "" for m in STDLIB_PROSE]
    text = "\n\n".join(parts)
    with path.open("w") as f:
        for i in range(0, len(text), chunk_chars):
            f.write(json.dumps({"text": text[i:i + chunk_chars]}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="Grok-1's tokenizer.model")
    p.add_argument("--model", default="grok-1", help="a GrokConfig preset (its widths)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    tok = Tokenizer(args.tokenizer)
    # the preset's widths with the tokenizer's vocabulary (Grok-1's own for "grok-1")
    config = GrokConfig.preset(args.model).replace(num_layers=args.layers,
                                                   vocab_size=tok.vocab_size)
    lora = LoraConfig(r=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    work = Path(tempfile.mkdtemp(prefix="lora_bench_"))
    write_jsonl(work / "text.jsonl")
    prepare_data(work / "text.jsonl", tok, work / "data", val_fraction=0.1)
    t0 = time.perf_counter()
    model = random_weights(config, quantized=True, device=args.device)
    apply_lora(model, lora)
    build_s = time.perf_counter() - t0
    (work / "config.json").write_text(json.dumps(config.to_dict()))
    cfg = TrainConfig(data_dir=str(work / "data"), out_dir=str(work / "run"),
                      model=str(work / "config.json"),
                      batch_size=args.batch, seq_len=args.seq, max_steps=args.steps, lr=args.lr,
                      min_lr=args.lr / 10, warmup_steps=2, activation_checkpointing=True,
                      device=args.device, save_every=10 ** 6, eval_every=args.steps,
                      eval_batches=4, log_every=max(1, args.steps // 3), progress=False,
                      tensorboard=False, watchdog_s=0)
    trainer = Trainer(cfg, model=model)
    before = trainer.evaluate()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    last = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() if cuda else None
    plan = lora_memory_plan(config, lora.r, lora.targets, seq_len=args.seq,
                            micro_batch=args.batch)
    r = {"kind": "lora_finetune", "model": args.model, "layers": args.layers,
         "weights": "int8 (random, the release's form)", "rank": lora.r,
         "targets": list(lora.targets), "batch": args.batch, "seq_len": args.seq,
         "steps": args.steps, "activation_checkpointing": True,
         "val_loss_before": before, "val_loss_after": last.get("val_loss"),
         "train_loss_last": last.get("loss"),
         "tok_s": args.steps * args.batch * args.seq / train_s, "build_s": build_s,
         "peak_gib": None if peak is None else peak / 2 ** 30,
         "plan_gib": plan.total_bytes / 2 ** 30,
         "plan_breakdown_gib": plan.breakdown_gib(),  # so a GPU run shows which term is off
         "peak_over_plan": None if peak is None else peak / plan.total_bytes}
    print(f"LoRA r={lora.r} on {args.layers} layers of {args.model}, {args.batch} x {args.seq} "
          f"tokens a step: held-out loss {before:.3f} -> {r['val_loss_after']:.3f} after "
          f"{args.steps} steps, {r['tok_s']:.0f} tok/s"
          + (f" | peak {r['peak_gib']:.2f} GiB, plan {r['plan_gib']:.2f} GiB "
             f"({100 * r['peak_over_plan']:.1f} % of it; the issue's bound: within 10 %)"
             if peak is not None else ""), flush=True)
    print("plan, GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in plan.breakdown_gib().items()))
    env = environment() if cuda else {"gpu": "cpu"}
    r.update(env)
    out = args.out or Path("bench/results") / env["gpu"].replace(" ", "_")
    print(f"wrote {write_results([r], out)}")


if __name__ == "__main__":
    main()
