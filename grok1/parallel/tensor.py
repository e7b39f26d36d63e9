"""Tensor parallelism applied to an unchanged Grok1 (gpt-fast tp.py, torchtitan parallelize.py).

`plan(config, layout)` is the one table: for each matrix of a decoder layer, which slice a rank
holds. The sharded loader (load.py) reads exactly these slices from the checkpoint, and
`shard_model_` cuts them out of an already loaded (or meta) model, so both give the same tensors.

Per layer, with R ranks:
- attention: wq/wk/wv split by output columns = whole heads (query heads N/R per rank, kv heads
  K/R, or, when R > K, each kv head replicated on R/K ranks); wo split by input rows = the same
  query heads, so each rank's wo gives a partial sum, kept in f32, all-reduced and rounded once
  (RowParallelLinear).
- MoE ("tp"): every expert's F split: w_gate/w_up by columns, w_down by rows with its 8 scale
  groups; ("ep"): whole experts per rank. Either way the partial outputs are all-reduced in f32
  before the one bf16 rounding (expert.py).
- Grok-2's dense MLP (with the attention): w_gate/w_up by columns of its width, w_down by rows,
  a RowParallelLinear as wo.
- unembedding ("vocab"): each rank multiplies by its rows of the output table and the logits are
  all-gathered (no partial sums, so the values equal one process's); ("dim"): D split, the f32
  partial logits all-reduced (the reference's sharding of the table, SPEC 4).
The embedding table itself stays whole on every rank (the input lookup needs all rows); an
untied head (Grok-2's lm_head) is cut to the rank's vocabulary columns (or rows of D).
Shape letters as in model.py.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from grok1.config import ConfigError
from grok1.model import BF16, Grok1, Linear, PartialSums, matmul, wide_dtype
from grok1.parallel.expert import ParallelMoE
from grok1.parallel.mesh import all_gather_last, all_reduce_, group_size
from grok1.quant import WeightFormat
from grok1.sharding import (  # noqa: F401 - the layout's names, also imported from here
    Layout,
    LocalShapes,
    Split,
    head_split,
    local_config,
    local_shapes,
    plan,
)

# ---- slicing (shared with the sharded loader) ---------------------------------------------------

def _packed_rows(fmt: WeightFormat | None) -> int:
    """Input rows per stored row: 2 for int4 (two codes a byte along the input), else 1."""
    return 2 if fmt is not None and fmt.name == "int4" else 1


def slice_weight(w: torch.Tensor, split: Split, fmt: WeightFormat | None = None,
                 name: str = "weight") -> torch.Tensor:
    """The rank's view of a weight [(E,) in, out] as stored in format `fmt` (None: dense or
    the release's int8): an int4 weight holds input rows in pairs, so a row split takes whole
    bytes (ConfigError naming `name` when it would cut a pair)."""
    start, n = split.start, split.stop - split.start
    if split.dim == "in" and (per := _packed_rows(fmt)) > 1:
        if start % per or n % per:
            raise ConfigError(f"{name}: rows {split.start}:{split.stop} cut a byte of int4 "
                              "codes (two input rows each); choose a --tp that splits evenly")
        start, n = start // per, n // per
    return w.narrow(split.weight_dim, start, n)


def slice_scales(s: torch.Tensor, split: Split, d_in: int, name: str = "scales",
                 fmt: WeightFormat | None = None) -> torch.Tensor:
    """The rank's view of scales [(E,) G, out] for a weight with input dim `d_in`.

    Row splits keep the scale groups their rows fall in: groups of d_in / G rows (the
    release's int8: 8 groups over 2 ranks gives 4 each; over 16 ranks each rank's rows lie
    inside one group) or of `fmt.group_size` rows (int4, whose last group may be shorter).
    One group (G = 1: fp8, int8's G = 1) is kept whole. Raises ConfigError naming `name`
    when a rank's rows cut across a group boundary.
    """
    if split.dim != "in":
        return s.narrow(split.weight_dim, split.start, split.stop - split.start)
    G = s.shape[-2]
    if G == 1:
        return s
    block = fmt.group_size if fmt is not None and fmt.group_size else d_in // G
    start, stop = split.start, split.stop
    if start % block == 0 and (stop % block == 0 or stop == d_in):
        return s.narrow(-2, start // block, -(-stop // block) - start // block)
    if start // block == (stop - 1) // block:  # inside one group: its scale alone
        return s.narrow(-2, start // block, 1)
    raise ConfigError(f"{name}: rows {split.start}:{split.stop} of {d_in} cut across its {G} "
                      f"scale groups of {block} rows; choose a --tp that splits them evenly")


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that does not keep the full tensor's storage alive."""
    return t.clone(memory_format=torch.contiguous_format)


def shard_linear_(lin: Linear, split: Split, name: str) -> None:
    """Replace a Linear's weight (and scales) by this rank's slice, in place (meta works too)."""
    fmt = lin.weights
    d_in = lin.weight.shape[-2] * _packed_rows(fmt)
    size = d_in if split.dim == "in" else lin.weight.shape[split.weight_dim]
    if split.start == 0 and split.stop == size:
        return  # whole: nothing to cut
    w = _owned(slice_weight(lin.weight, split, fmt, f"{name}.weight"))
    if isinstance(lin.weight, nn.Parameter):
        lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    else:
        lin.weight = w  # a registered buffer stays a buffer
    if lin.scales is not None:
        lin.scales = _owned(slice_scales(lin.scales, split, d_in, f"{name}.scales", fmt))


def shard_model_(model: Grok1, layout: Layout) -> Grok1:
    """Cut every decoder layer's matrices down to this rank's slices (no communication).

    The attention modules get the local head counts and the model declares its `layout`. On a
    meta model this only changes shapes (the loader fills them).
    """
    if model.layout is not None:
        raise ValueError(f"model is already sharded ({model.layout}); shard it once")
    table = plan(model.config, layout)
    attn_config = local_config(model.config, layout)
    for i, layer in enumerate(model.layers):
        for path, split in table.items():
            shard_linear_(layer.get_submodule(path), split, f"layers.{i}.{path}")
        layer.attn.config = attn_config
    if (split := head_split(model.config, layout)) is not None:
        shard_linear_(model.lm_head, split, "lm_head")
    model.layout = layout
    return model


# ---- applying a layout with its collectives ---------------------------------------------------

def matmul_partial(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 x @ bf16 w with the accumulator returned unrounded (a partial sum), in
    `wide_dtype`: f32 on GPUs, f64 on the CPU (so the sum over ranks, rounded once, is one
    process's value to the bit)."""
    if x.is_cuda and x.dtype == BF16 and _cuda_mm_has_out_dtype():  # a bf16 GEMM writing f32
        out = torch.mm(x.reshape(-1, x.shape[-1]), w, out_dtype=torch.float32)
        return out.view(*x.shape[:-1], w.shape[-1])
    wide = wide_dtype(x.device)
    return x.to(wide) @ w.to(wide)  # products of bf16 values are exact in f32


@functools.cache
def _cuda_mm_has_out_dtype() -> bool:
    """Whether this torch has torch.mm(..., out_dtype=) for bf16 on CUDA (2.8 and later)."""
    a = torch.ones(16, 16, dtype=BF16, device="cuda")
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class RowParallelLinear(nn.Module):
    """A Linear holding rows of W (a slice of the input dim): x_local @ W_local is a partial
    sum, kept in f32, all-reduced over `group` and rounded to bf16 once, as one process's
    matmul rounds once. (Rounding each rank's partial to bf16 before the sum, as SPEC 2.8
    guessed the reference does, moves the golden logits by 21 %: it is not what it does.)
    Holds the Linear's own tensors under the same names; on CUDA a quantized weight (int8,
    int4, fp8) goes through grok1.ops.linear's kernel."""

    def __init__(self, linear: Linear, group: dist.ProcessGroup | None):
        from grok1.ops.linear import input_dim, kernel_supported

        super().__init__()
        if linear.weight.dim() != 2:
            raise ValueError("RowParallelLinear: an expert-stacked weight is split by expert.py")
        if isinstance(linear.weight, nn.Parameter):  # the same tensors under the same names
            self.weight = linear.weight
        else:
            self.register_buffer("weight", linear.weight)
        if linear.scales is not None:
            self.register_buffer("scales", linear.scales)
        else:
            self.scales = None
        self.weights = linear.weights  # Linear.dense reads the format
        self.group = group
        self.kernel_ok = self.weights is not None and kernel_supported(
            input_dim(self.weights, self.weight), self.scales.shape[0], self.weights)

    @property
    def quantized(self) -> bool:
        return Linear.quantized.fget(self)

    def dense(self) -> torch.Tensor:
        return Linear.dense(self)

    def forward(self, x: torch.Tensor) -> PartialSums:
        """The f32 sum over ranks (f64 on the CPU) [1, ..., N], before its one rounding to bf16
        (`value()`, or the engine's fused residual norm)."""
        from grok1.ops._triton import use_kernel

        if self.kernel_ok and use_kernel(x):
            from grok1.ops.linear import quant_linear

            x_MK = x.reshape(-1, x.shape[-1])
            partial = quant_linear(x_MK, self.weight, self.scales, out_dtype=torch.float32,
                                   weights=self.weights)
            partial = partial.view(*x.shape[:-1], -1)
        else:
            partial = matmul_partial(x, self.dense())
        return PartialSums(all_reduce_(partial, self.group)[None])


class ShardedUnembedding(nn.Module):
    """The unembedding over ranks (replaces `Grok1.unembedding`), in the compute dtype (h's):
    "vocab", each rank multiplies by its rows of the table and the logits are all-gathered
    (the values equal one process's); "dim", D split, the partial logits all-reduced in f32
    (f64 on the CPU) and rounded once. `table_is_local`: the table passed in is this rank's
    piece already (a sharded untied lm_head); else it is the whole tied embedding, of which
    the rank takes a view."""

    def __init__(self, shapes: LocalShapes, split: str, group: dist.ProcessGroup | None,
                 table_is_local: bool = False):
        super().__init__()
        self.shapes, self.split, self.group = shapes, split, group
        self.table_is_local = table_is_local

    def forward(self, h_BTD: torch.Tensor, table_VD: torch.Tensor, multiplier: float
                ) -> torch.Tensor:
        s, dtype = self.shapes, h_BTD.dtype
        if self.split == "vocab":
            if not self.table_is_local:
                table_VD = table_VD[s.vocab.start:s.vocab.stop]  # a view: no copy of the table
            logits = matmul(h_BTD, table_VD.to(dtype).T) * multiplier
            return all_gather_last(logits, self.group)
        if self.split == "dim":
            d = slice(s.emb.start, s.emb.stop)
            if not self.table_is_local:
                table_VD = table_VD[:, d]
            partial = matmul_partial(h_BTD[..., d], table_VD.to(dtype).T)
            logits = all_reduce_(partial, self.group).float().to(dtype)  # one rounding
            return logits * multiplier
        return matmul(h_BTD, table_VD.to(dtype).T) * multiplier


def parallelize(model: Grok1, group: dist.ProcessGroup | None, layout: Layout) -> Grok1:
    """Shard `model` in place for `layout` (unless a meta build was sharded already with the
    same layout) and add the collectives over `group`, by replacing modules with their
    parallel forms (same tensors, same names): attention's wo (and the dense MLP's w_down) by a
    RowParallelLinear, the MoE by a ParallelMoE (expert.py), the unembedding by a
    ShardedUnembedding."""
    if group_size(group) != layout.size:
        raise ConfigError(f"layout of {layout.size} ranks on a group of {group_size(group)}")
    if model.layout is None:
        shard_model_(model, layout)
    elif model.layout != layout:
        raise ValueError(f"model was sharded for {model.layout}, not {layout}")
    s = local_shapes(model.config, layout)
    for layer in model.layers:
        if layout.attn == "tp":
            layer.attn.wo = RowParallelLinear(layer.attn.wo, group)
            if layer.mlp is not None:  # Grok-2's dense MLP, split with the attention
                layer.mlp.w_down = RowParallelLinear(layer.mlp.w_down, group)
        if layout.moe != "none":
            layer.moe = ParallelMoE(layer.moe, s.experts, group)
    model.unembedding = ShardedUnembedding(s, layout.unembed, group,
                                           table_is_local=model.lm_head is not None)
    return model


def apply_tp(model: Grok1, tp_group: dist.ProcessGroup | None, *, moe: str = "tp",
             unembed: str = "vocab") -> Grok1:
    """Tensor parallelism over `tp_group`: attention by heads, the MoE by expert width
    (`moe="tp"`) or by whole experts (`moe="ep"`), the unembedding by vocabulary or D.
    Works on a loaded model (slices it) or on a meta model before sharded loading."""
    layout = Layout(group_size(tp_group), 0 if tp_group is None else dist.get_rank(tp_group),
                    attn="tp", moe=moe, unembed=unembed)
    return parallelize(model, tp_group, layout)


def apply_ep(model: Grok1, ep_group: dist.ProcessGroup | None) -> Grok1:
    """Expert parallelism alone: whole experts per rank of `ep_group`; attention and the
    unembedding stay whole on every rank. (`apply_tp(model, g, moe="ep")` combines both.)"""
    rank = 0 if ep_group is None else dist.get_rank(ep_group)
    layout = Layout(group_size(ep_group), rank, attn="none", moe="ep", unembed="none")
    return parallelize(model, ep_group, layout)
