"""Export a training run's newest checkpoint to grok1's native folder (grok1.checkpoint.native):
config.json + model.safetensors + tokenizer.model, which `grok1 generate --checkpoint DIR` loads.

The f32 master weights become the inference dtypes of `Grok1(config, dtype=bf16)`: bf16 embedding
and matrices, f32 norms and router, as in the reference checkpoint (dense, not quantized).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from grok1.config import GrokConfig
from grok1.model import Grok1
from grok1.train.checkpoints import CheckpointCorruptError, CheckpointManager, quiet_single_process


class _ModelOnly:
    """DCP Stateful that reads only the model part of a training checkpoint."""

    def __init__(self, model: Grok1):
        self.model = model

    def state_dict(self) -> dict:
        return {"model": get_model_state_dict(self.model)}

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state["model"])


def load_trained(run_dir: str | Path, step: int | None = None) -> tuple[Grok1, int]:
    """The f32 model of a run folder (its config.json and checkpoints/), at the newest good
    checkpoint or at `step`. Raises CheckpointCorruptError when there is none."""
    run_dir = Path(run_dir)
    config = GrokConfig.from_json(run_dir / "config.json")
    model = Grok1(config, dtype=torch.float32)
    manager = CheckpointManager(run_dir / "checkpoints")
    steps = manager.committed_steps() if step is None else [step]
    if not steps or steps[0] not in manager.committed_steps():
        raise CheckpointCorruptError(f"{manager.root}: no committed checkpoint"
                                     + (f" at step {step}" if step is not None else ""))
    manager.verify(steps[0])
    with quiet_single_process():
        dcp.load({"app": _ModelOnly(model)}, checkpoint_id=str(manager.step_dir(steps[0])),
                 no_dist=True)
    return model, steps[0]


def export_run(run_dir: str | Path, out_dir: str | Path, tokenizer_path: str | Path | None, *,
               step: int | None = None, dtype: torch.dtype = torch.bfloat16,
               overwrite: bool = False) -> Path:
    """Write the run's model as a grok1 native folder at out_dir; returns out_dir."""
    from grok1.checkpoint.native import save_native

    trained, _ = load_trained(run_dir, step)
    model = Grok1(trained.config, dtype=dtype)
    model.load_state_dict(trained.state_dict())  # casts matrices to dtype; norms, router stay f32
    return save_native(model, out_dir, tokenizer_path, overwrite=overwrite)
