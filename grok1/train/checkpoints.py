"""Training checkpoints that survive a kill at any moment.

Layout under the checkpoint root:
    step-00000120/            one folder per save
        .metadata, __R_0.distcp   model + optimizer, sharded, by torch.distributed.checkpoint
        rank-R.pt             per-rank plain state: trainer step, data position, RNG states
        COMMITTED             written last: JSON with the step and every file's size and sha256
A save writes `.step-N.tmp/`, renames it to `step-N/` and only then writes COMMITTED, so a folder
without the marker (a crash mid-save) is never loaded. Loading takes the newest committed folder
whose files match the marker and falls back to the next older one when a folder fails that check
or fails to load; `keep >= 2` so one good checkpoint always exists while the next is written.
Sources: torchtitan's checkpointer (components/checkpointer), torch.distributed.checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointCorruptError(RuntimeError):
    """A committed checkpoint folder whose files do not match its marker."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's value of obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item())


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load even with no_dist=True; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves and restores {"model", "optim"} (DCP, sharded) plus per-rank plain state.

    `app_state` maps names to objects with state_dict()/load_state_dict() whose tensors DCP
    shards (model and optimizer wrappers); `rank_state` is a per-rank picklable dict.
    """

    def __init__(self, root: str | Path, *, keep: int = 2, verify_hashes: bool = True):
        if keep < 2:
            raise ValueError(f"keep={keep}: need >= 2 so a good checkpoint exists while the next "
                             f"is written")
        self.root, self.keep, self.verify_hashes = Path(root), keep, verify_hashes

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def committed_steps(self) -> list[int]:
        """Steps with a COMMITTED marker, newest first (their files are not checked here)."""
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
        return sorted(steps, reverse=True)

    # ---- save ---------------------------------------------------------------------------------
    def save(self, step: int, app_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the committed folder."""
        final = self.step_dir(step)
        tmp = self.root / f".step-{step:08d}.tmp"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash mid-save
        _barrier()
        with quiet_single_process():
            dcp.save(app_state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        torch.save(rank_state, tmp / f"rank-{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            record = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized()
                      else 1, "files": {p.name: {"bytes": p.stat().st_size,
                                                 **({"sha256": _sha256(p)}
                                                    if self.verify_hashes else {})}
                                        for p in files}}
            for p in files:
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():  # an uncommitted leftover of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker_tmp = final / (MARKER + ".tmp")
            marker_tmp.write_text(json.dumps(record, indent=1) + "\n")
            with open(marker_tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(marker_tmp, final / MARKER)
            _fsync_dir(final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        """Keep the newest `keep` committed folders; drop older ones and stale uncommitted ones."""
        committed = self.committed_steps()
        for step in committed[self.keep:]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
        newest = committed[0] if committed else -1
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and int(m.group(1)) < newest and not (p / MARKER).is_file() or p.name.startswith(".step-") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------------
    def verify(self, step: int) -> None:
        """Check every file against the marker. Raises CheckpointCorruptError naming the file."""
        folder = self.step_dir(step)
        record = json.loads((folder / MARKER).read_text())
        for name, want in record["files"].items():
            path = folder / name
            if not path.is_file():
                raise CheckpointCorruptError(f"{path}: missing (listed in {MARKER})")
            size = path.stat().st_size
            if size != want["bytes"]:
                raise CheckpointCorruptError(f"{path}: {size} bytes, {MARKER} says {want['bytes']}")
            if "sha256" in want and _sha256(path) != want["sha256"]:
                raise CheckpointCorruptError(f"{path}: sha256 differs from {MARKER}; file damaged")

    def load_latest(self, app_state: dict[str, Any],
                    on_fallback: Callable[[int, str], None] | None = None
                    ) -> tuple[int, dict[str, Any]] | None:
        """Collective. Load the newest good checkpoint into app_state in place; returns
        (step, this rank's rank_state), or None when there is none (a fresh run).

        A folder that fails verification or loading is skipped (on_fallback(step, reason) is
        called on rank 0) and the next older one is tried. Raises CheckpointCorruptError when
        committed folders exist but none loads (never silently restarts from scratch).
        """
        candidates = _broadcast(self.committed_steps())
        for step in candidates:
            reason = None
            if _rank() == 0:
                try:
                    self.verify(step)
                except (CheckpointCorruptError, OSError, ValueError, KeyError) as e:
                    reason = str(e)
            reason = _broadcast(reason)
            if reason is None:
                try:
                    with quiet_single_process():
                        dcp.load(app_state, checkpoint_id=str(self.step_dir(step)),
                                 no_dist=not dist.is_initialized())
                    rank_file = self.step_dir(step) / f"rank-{_rank()}.pt"
                    rank_state = torch.load(rank_file, weights_only=True)
                except (RuntimeError, OSError, ValueError, EOFError, KeyError) as e:
                    reason = f"{self.step_dir(step)}: load failed: {type(e).__name__}: {e}"
                if _any_rank(reason is not None):
                    reason = reason or f"{self.step_dir(step)}: load failed on another rank"
                else:
                    return step, rank_state
            if _rank() == 0:
                log.warning("checkpoint step %d unusable, trying an older one: %s", step, reason)
                if on_fallback is not None:
                    on_fallback(step, reason)
        if candidates:
            raise CheckpointCorruptError(f"{self.root}: none of the {len(candidates)} committed "
                                         f"checkpoints loads; see the warnings above")
        return None
