"""The command-line options of a sharded run (--tp, --moe, --unembed) and whether this process is
one of several ranks. Nothing here imports torch: `grok1 generate --help` and `grok1 serve --help`
build these options, and should answer at once."""

from __future__ import annotations

import argparse
import os

MOE_SPLITS = ("tp", "ep")  # each expert's width over the ranks, or whole experts per rank
UNEMBED_SPLITS = ("vocab", "dim")  # rows of the tied table (logits gathered), or D (all-reduced)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--tp / --moe / --unembed for generate, serve and bench."""
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks (= torchrun's processes; default: WORLD_SIZE or 1)")
    p.add_argument("--moe", choices=MOE_SPLITS, default="tp",
                   help="MoE split: tp = each expert's width over ranks, ep = whole experts")
    p.add_argument("--unembed", choices=UNEMBED_SPLITS, default="vocab",
                   help="unembedding split: vocab rows (logits gathered) or D (all-reduced)")


def wants_parallel(args: argparse.Namespace) -> bool:
    """Whether this process is one of several ranks (under torchrun, or asked for --tp > 1)."""
    return (getattr(args, "tp", None) or 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
