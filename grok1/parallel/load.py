"""Per-rank sharded loading of the release checkpoint: each rank keeps only its own slices.

The model is built on the meta device, cut to this rank's shapes by `tensor.shard_model_`, and
filled by the checkpoint loader (grok1.checkpoint.xai_pickle) through its `shard_fn` hook, which
hands over each tensor as stored and takes back this rank's piece, cut by the same table
(`tensor.plan`) that slices an already loaded model: so a sharded load equals slicing the full
load. Quantized matrices split along their input dim take their scale groups with them (the 8
groups of wo / w_down give 4 per rank on 2 ranks, 2 on 4, 1 on 8); matrices with one group
(wq/wk/wv, w_gate/w_up) have their scales split along the output dim like the weight.
Host memory stays bounded by the loader's in-flight limit; only rank 0 shows a progress bar.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from grok1.checkpoint.xai_pickle import load_xai_checkpoint, release_specs
from grok1.config import GrokConfig
from grok1.model import BF16, Grok1
from grok1.parallel.tensor import (
    Layout,
    parallelize,
    plan,
    shard_model_,
    slice_scales,
    slice_weight,
)

_MATRIX_KEY = re.compile(r"layers\.\d+\.(.+)\.(weight|scales)")


def make_shard_fn(config: GrokConfig, layout: Layout):
    """shard_fn(state-dict key, full tensor) -> this rank's piece: a view of the (memory-mapped)
    tensor, so only the piece's pages are read when the loader copies it to the device."""
    table = plan(config, layout)
    full_shapes = {k: shape for k, (shape, _) in release_specs(config).items()}

    def shard_fn(key: str, t: torch.Tensor) -> torch.Tensor:
        m = _MATRIX_KEY.fullmatch(key)
        if m is None or m.group(1) not in table:
            return t  # embedding, norms, router: whole on every rank
        split = table[m.group(1)]
        if m.group(2) == "weight":
            piece = slice_weight(t, split)
        else:
            d_in = full_shapes[key[:-len("scales")] + "weight"][-2]
            piece = slice_scales(t, split, d_in, key)
        return piece

    return shard_fn


def load_sharded(checkpoint_dir: str | Path, config: GrokConfig, layout: Layout, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = BF16,
                 progress: bool = True, workers: int = 4,
                 max_inflight_bytes: int = 8 << 30) -> Grok1:
    """The release checkpoint's slices for `layout.rank`, quantized as released, on `device`.

    Files are memory-mapped and only this rank's slices are read; `max_inflight_bytes` counts
    whole files in flight (the loader's bound), of which a rank holds only its 1/R share.

    The returned model is sharded (`model.parallel_layout == layout`) but has no collectives
    yet: `parallelize(model, group, layout)` adds them (see `load_parallel`). Raises the
    loader's CheckpointError / UnsafePickleError, ConfigError for a layout the model can't take.
    """
    with torch.device("meta"):
        model = Grok1(config, quantized=True, dtype=dtype)
    shard_model_(model, layout)
    return load_xai_checkpoint(checkpoint_dir, config, device=device, dtype=dtype, model=model,
                               shard_fn=make_shard_fn(config, layout), workers=workers,
                               max_inflight_bytes=max_inflight_bytes, progress=progress)


def load_parallel(checkpoint_dir: str | Path, config: GrokConfig,
                  group: dist.ProcessGroup | None, *, moe: str = "tp", unembed: str = "vocab",
                  device: torch.device | str = "cpu", progress: bool = True) -> Grok1:
    """Sharded load plus collectives: this rank's tensor-parallel Grok1 over `group`."""
    size = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    layout = Layout(size, rank, attn="tp", moe=moe, unembed=unembed)
    model = load_sharded(checkpoint_dir, config, layout, device=device,
                         progress=progress and (not dist.is_initialized() or dist.get_rank() == 0))
    return parallelize(model, group, layout)
