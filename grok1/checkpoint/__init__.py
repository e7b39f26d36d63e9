"""Checkpoint formats: readers that fill a model built on the meta device, tensor by tensor.

`xai_pickle` reads the release's pickles without running code; `native` reads and writes
grok1's own config.json + model.safetensors folder; names.py maps the parameter names between
them. Both readers take a per-rank `shard_fn`, so a rank reads only its slices. Models are
built through grok1.load (grok1/loading.py), which recognises the format.
"""

from __future__ import annotations

from grok1.checkpoint.names import CheckpointError, ShardFn
from grok1.checkpoint.native import load_native, save_native
from grok1.checkpoint.xai_pickle import UnsafePickleError, load_xai_checkpoint

__all__ = ["CheckpointError", "ShardFn", "UnsafePickleError", "load_native", "load_xai_checkpoint",
           "save_native"]
