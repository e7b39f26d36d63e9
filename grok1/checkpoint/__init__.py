"""Checkpoints: `load` finds the format (xAI release ckpt-0 or a grok1 folder) and builds the model.

Formats: `xai_pickle` (the release's pickles, read without running code), `native` (grok1's own
config.json + model.safetensors folder); names.py maps the parameter names between them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grok1.checkpoint.names import CheckpointError
from grok1.checkpoint.native import WEIGHTS_FILE, load_native, save_native
from grok1.checkpoint.xai_pickle import UnsafePickleError, load_xai_checkpoint, resolve_ckpt0
from grok1.config import GrokConfig
from grok1.model import Grok1

__all__ = ["CheckpointError", "UnsafePickleError", "load", "load_native", "load_xai_checkpoint",
           "save_native"]


def load(checkpoint_dir: str | Path, config: GrokConfig | str | Path | None = None,
         device: torch.device | str = "cpu", *, dtype: torch.dtype | None = None,
         progress: bool = True) -> Grok1:
    """The Grok1 in `checkpoint_dir`, in eval mode with gradients off.

    `checkpoint_dir` holds the release's `ckpt-0/` (or is that folder), or is a grok1 folder
    (`model.safetensors` + `config.json`, see grok1.checkpoint.native). `config` is a GrokConfig,
    a JSON file of its fields, or None: the `grok-1` preset for a release checkpoint, the
    folder's own config.json for a grok1 folder. `dtype` is that of the embedding (and of dense
    matrices); default bf16 for a release checkpoint, as saved for a grok1 folder. The release's
    int8 matrices stay int8 with their bf16 scales.

    Raises CheckpointError (UnsafePickleError for a pickle that would run code) naming the file.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder (a folder holding the "
                              f"release's ckpt-0/, or a grok1 folder: {WEIGHTS_FILE} + "
                              "config.json)")
    if isinstance(config, (str, Path)):
        config = GrokConfig.from_json(config)
    if (path / WEIGHTS_FILE).is_file():
        model = load_native(path, config, device=device, dtype=dtype)
    else:
        try:
            ckpt0 = resolve_ckpt0(path)
        except CheckpointError:
            raise CheckpointError(f"{path}: neither a release checkpoint (ckpt-0/tensorNNNNN_000) "
                                  f"nor a grok1 folder ({WEIGHTS_FILE} + config.json)") from None
        model = load_xai_checkpoint(ckpt0, config or GrokConfig.preset("grok-1"), device=device,
                                    dtype=dtype or torch.bfloat16, progress=progress)
    return model.eval().requires_grad_(False)
