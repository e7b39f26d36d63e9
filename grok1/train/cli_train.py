"""Arguments and entry points of `grok1 train`, `grok1 tokenize`, `grok1 train-tokenizer` and
`grok1 export`; grok1/cli.py wires them as subcommands (add_*_args, then run_*)."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
from pathlib import Path


def _train_defaults() -> dict:
    """TrainConfig's defaults, so the flags and the dataclass never disagree."""
    from grok1.train.train_config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING}


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = _train_defaults()
    p.add_argument("--data", required=True, help="token dataset folder from `grok1 tokenize`")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl; an "
                   "existing run resumes from its newest complete checkpoint")
    p.add_argument("--model", default=d["model"],
                   help="preset (tiny, debug, train-1b, grok-1) or config.json")
    _add_run_args(p, d)
    p.add_argument("--export", type=Path, default=None,
                   help="after training, export the model here (grok1 native folder)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer copied into --export (default: the dataset's)")


def _add_run_args(p: argparse.ArgumentParser, d: dict) -> None:
    """The options `grok1 train` and `grok1 finetune` share: TrainConfig's fields."""
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per rank "
                   "per micro-step")
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"])
    p.add_argument("--max-steps", type=int, default=d["max_steps"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--min-lr", type=float, default=d["min_lr"])
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--beta1", type=float, default=d["beta1"])
    p.add_argument("--beta2", type=float, default=d["beta2"])
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="0 = off")
    p.add_argument("--aux-loss-coef", type=float, default=d["aux_loss_coef"])
    p.add_argument("--z-loss-coef", type=float, default=d["z_loss_coef"])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--expert-down", choices=("f32", "bf16"), default=d["expert_down"],
                   help="the experts' down-projection: f32 (the reference's) or bf16 (faster)")
    p.add_argument("--attention", choices=("plain", "flex"), default=d["attention"],
                   help="plain (the reference's rounding) or flex (torch's fused flex_attention, "
                        "f32 scores: faster, GPU only)")
    p.add_argument("--parallel", choices=("auto", "fsdp", "ddp", "none"), default=d["parallel"],
                   help="auto: FSDP2 when launched on several ranks")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--save-every", type=int, default=d["save_every"])
    p.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"])
    p.add_argument("--eval-every", type=int, default=d["eval_every"])
    p.add_argument("--eval-batches", type=int, default=d["eval_batches"])
    p.add_argument("--log-every", type=int, default=d["log_every"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-GPU peak for MFU (default: from the GPU name; bf16 dense)")
    p.add_argument("--watchdog-s", type=float, default=d["watchdog_s"], help="0 = off")
    p.add_argument("--max-bad-steps", type=int, default=d["max_bad_steps"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true")


def train_config_from_args(args: argparse.Namespace, data_dir: str | None = None,
                           model: str | None = None):
    from grok1.train.train_config import TrainConfig

    return TrainConfig(
        data_dir=args.data if data_dir is None else data_dir, out_dir=args.out,
        model=args.model if model is None else model, seed=args.seed,
        batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
        max_steps=args.max_steps, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, beta1=args.beta1,
        beta2=args.beta2, grad_clip=args.grad_clip, aux_loss_coef=args.aux_loss_coef,
        z_loss_coef=args.z_loss_coef, activation_checkpointing=args.activation_checkpointing,
        compile=args.compile, expert_down=args.expert_down, attention=args.attention,
        parallel=args.parallel, device=args.device, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every,
        eval_batches=args.eval_batches, log_every=args.log_every, peak_tflops=args.peak_tflops,
        watchdog_s=args.watchdog_s, max_bad_steps=args.max_bad_steps,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard)


def run_train(args: argparse.Namespace) -> None:
    import os

    from grok1.train.data import load_meta
    from grok1.train.trainer import train

    logging.getLogger("grok1").setLevel(logging.INFO)
    cfg = train_config_from_args(args)
    train(cfg)
    if args.export is not None and int(os.environ.get("RANK", "0")) == 0:
        from grok1.train.export import export_run

        tokenizer = args.tokenizer or load_meta(args.data)["tokenizer"]
        out = export_run(args.out, args.export, tokenizer, overwrite=True)
        print(f"exported {out}")


def add_tokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="text files or glob patterns (one document each)")
    p.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece model")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="tail of each document held out for validation")
    p.add_argument("--shard-tokens", type=int, default=1 << 26)


def _expand(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if matched:
            paths.extend(Path(m) for m in matched)
        else:
            paths.append(Path(pattern))  # reported as missing by the callee
    return paths


def run_tokenize(args: argparse.Namespace) -> None:
    from grok1.train.data import tokenize_files

    meta = tokenize_files(_expand(args.inputs), args.tokenizer, args.out,
                          val_fraction=args.val_fraction, shard_tokens=args.shard_tokens)
    counts = {split: sum(s["tokens"] for s in shards) for split, shards in meta["shards"].items()}
    print(f"{args.out}: {len(meta['documents'])} documents, {counts['train']} train and "
          f"{counts['val']} val tokens ({meta['dtype']})")


def add_train_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="text files or glob patterns")
    p.add_argument("--out", required=True, type=Path, help="path of the .model file to write")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="trainer threads (1 = deterministic)")


def run_train_tokenizer(args: argparse.Namespace) -> None:
    from grok1.train.tokenizer_train import train_tokenizer

    path = train_tokenizer(_expand(args.inputs), args.out, vocab_size=args.vocab_size,
                           num_threads=args.threads)
    print(f"wrote {path} (vocab {args.vocab_size})")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="training run folder (holds config.json, checkpoints/)")
    p.add_argument("--out", required=True, type=Path, help="grok1 native folder to write")
    p.add_argument("--tokenizer", type=Path, default=None, help="SentencePiece model to include")
    p.add_argument("--step", type=int, default=None, help="default: the newest good checkpoint")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--overwrite", action="store_true")


def run_export(args: argparse.Namespace) -> None:
    import torch

    from grok1.train.export import export_run

    out = export_run(args.run, args.out, args.tokenizer, step=args.step,
                     dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    print(f"exported {out}")


# LoRA's usual settings where they differ from pretraining's: a smaller LR, no weight decay
# and no load-balancing loss (the router is frozen; the adapters should not fight it)
FINETUNE_DEFAULTS = {"lr": 2e-4, "min_lr": 0.0, "warmup_steps": 10, "weight_decay": 0.0,
                     "aux_loss_coef": 0.0, "max_steps": 200, "save_every": 50, "eval_every": 50}


def lora_targets(text: str) -> tuple[str, ...]:
    """`--lora-targets`: comma-separated matrices (attn.wq ... moe.w_down) or groups
    (attention, experts, all)."""
    from grok1.info import LORA_TARGET_DIMS

    groups = {"attention": LORA_TARGET_DIMS[:4], "experts": LORA_TARGET_DIMS[4:],
              "all": LORA_TARGET_DIMS}
    out: list[str] = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        out += groups.get(word, (word,))
    return tuple(out)


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    d = {**_train_defaults(), **FINETUNE_DEFAULTS}
    p.add_argument("--base", required=True, type=Path, help="the base model's checkpoint folder "
                   "(any grok1.load reads; int8 stays int8)")
    p.add_argument("--data", required=True, type=Path, help='JSONL: {"text": ...} or '
                   '{"messages": [{"role", "content"}, ...]} per line')
    p.add_argument("--out", required=True, help="run folder: data/, checkpoints/, adapter/ "
                   "(PEFT format); an existing run resumes from its newest complete checkpoint")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="default: tokenizer.model in or beside --base")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0, help="scale = alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="attention", help="comma-separated: attn.wq, "
                   "attn.wk, attn.wv, attn.wo, moe.w_gate, moe.w_up, moe.w_down, or the groups "
                   "attention, experts, all")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the tail of the token stream held out for evaluation")
    _add_run_args(p, d)


def run_finetune(args: argparse.Namespace) -> None:
    from grok1.lora import LoraConfig
    from grok1.train.finetune import finetune

    logging.getLogger("grok1").setLevel(logging.INFO)
    lora = LoraConfig(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=lora_targets(args.lora_targets))
    cfg = train_config_from_args(args, data_dir="", model=str(args.base))
    result = finetune(args.base, args.data, cfg, lora, tokenizer=args.tokenizer,
                      val_fraction=args.val_fraction)
    print(f"adapter {result['adapter']}")


def add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, help="the base model's checkpoint folder")
    p.add_argument("--adapter", required=True, type=Path, help="a PEFT LoRA folder "
                   "(adapter_config.json + adapter_model.safetensors), e.g. OUT/adapter")
    p.add_argument("--out", required=True, type=Path, help="grok1 folder to write (bf16 "
                   "matrices; `grok1 convert` makes int8 of it)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="default: tokenizer.model in or beside --base")
    p.add_argument("--overwrite", action="store_true")


def run_merge(args: argparse.Namespace) -> None:
    from grok1.train.finetune import merge

    out = merge(args.base, args.adapter, args.out, tokenizer=args.tokenizer,
                overwrite=args.overwrite)
    print(f"merged {out}")


COMMANDS = {"train": (add_train_args, run_train), "tokenize": (add_tokenize_args, run_tokenize),
            "train-tokenizer": (add_train_tokenizer_args, run_train_tokenizer),
            "export": (add_export_args, run_export),
            "finetune": (add_finetune_args, run_finetune), "merge": (add_merge_args, run_merge)}


def main(argv: list[str] | None = None) -> None:
    """`python -m grok1.train.cli_train CMD ...`: the same subcommands without grok1/cli.py
    (what torchrun launches in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m grok1.train.cli_train")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, run) in COMMANDS.items():
        add(sub.add_parser(name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
