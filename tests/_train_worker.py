"""`grok1 train` with a rank that dies, for torchrun in tests/train/test_train_faults.py: the same
arguments as `python -m grok1.train.cli_train train`, plus --crash-at-step, injected through a
trainer hook so the fault switch stays out of grok1's own flags and TrainConfig."""

import argparse
import logging
import os
import sys
from pathlib import Path

from grok1.train.cli_train import add_train_args, train_config_from_args
from grok1.train.trainer import TrainerHook, train

CRASH_EXIT_CODE = 13


class CrashAfterStep(TrainerHook):
    """The last rank exits after step `step` unless `marker` exists (it writes the marker
    first), so the run restarted by torchrun goes on past it."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def after_step(self, trainer) -> None:
        if trainer.step != self.step or trainer.dist.rank != trainer.dist.world_size - 1:
            return
        if self.marker.exists():
            return
        self.marker.write_text(f"crashed after step {trainer.step}\n")
        sys.stderr.write(f"fault injection: rank {trainer.dist.rank} exits after step "
                         f"{trainer.step}\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT_CODE)  # no cleanup, as a killed process


def main() -> None:
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    parser.add_argument("--crash-at-step", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grok1").setLevel(logging.INFO)
    train(train_config_from_args(args),
          hooks=[CrashAfterStep(args.crash_at_step, Path(args.out) / "crash.marker")])


if __name__ == "__main__":
    main()
