"""Run monitoring for grok1.train: the hang watchdog and the metrics log (JSONL, TensorBoard)."""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

WATCHDOG_EXIT_CODE = 3


class Watchdog:
    """Exits the process (code 3) with a message and every thread's stack when `beat()` has not
    been called for timeout_s seconds: a hung collective or dataloader fails loudly, and torchrun
    can restart the job."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.last, self.what = timeout_s, time.monotonic(), "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grok1-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self, what: str) -> None:
        self.last, self.what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                sys.stderr.write(f"\ngrok1 train watchdog: no progress for {idle:.0f} s "
                                 f"(limit {self.timeout_s:.0f} s; last: {self.what}); a rank is "
                                 f"probably stuck in a collective. Stacks of all threads:\n")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)


class MetricsLog:
    """JSONL lines (and TensorBoard scalars when installed) from rank 0; appends across restarts."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        # open for the whole run (closed in close()); appends, so restarts extend one log
        self.file = open(out_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
