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
- unembedding ("vocab"): each rank multiplies by its rows of the tied table and the logits are
  all-gathered (no partial sums, so the values equal one process's); ("dim"): D split, the f32
  partial logits all-reduced (the reference's sharding of the table, SPEC 4).
The embedding table itself stays whole on every rank (the input lookup needs all rows).
Shape letters as in model.py.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import nn

from grok1.config import ConfigError, GrokConfig
from grok1.model import BF16, Grok1, Linear, wide_dtype
from grok1.parallel.mesh import all_gather_last, all_reduce_, group_size
from grok1.parallel.options import MOE_SPLITS, UNEMBED_SPLITS

ATTN_MODES = ("tp", "none")
MOE_MODES = (*MOE_SPLITS, "none")  # "none": unsplit (the options offer the splits alone)
UNEMBED_MODES = (*UNEMBED_SPLITS, "none")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One rank's place among `size` ranks, and how each part of the model is split over them
    ("none": kept whole on every rank)."""
    size: int = 1
    rank: int = 0
    attn: str = "tp"  # "tp": query and kv heads split
    moe: str = "tp"  # "tp": each expert's width F split; "ep": whole experts per rank
    unembed: str = "vocab"  # "vocab": table rows split, logits gathered; "dim": D split

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"rank {self.rank} of {self.size}: need 0 <= rank < size")
        for field, modes in (("attn", ATTN_MODES), ("moe", MOE_MODES),
                             ("unembed", UNEMBED_MODES)):
            if getattr(self, field) not in modes:
                raise ConfigError(f"{field}={getattr(self, field)!r}: expected one of "
                                  f"{', '.join(modes)}")


@dataclasses.dataclass(frozen=True)
class LocalShapes:
    """The global ids of what one rank holds (parallel code's local counts; the config stays
    global). Ranges index heads, experts, expert-width columns, vocabulary rows and D."""
    q_heads: range
    kv_heads: range
    experts: range
    ffn: range
    vocab: range  # the unembedding's rows of the tied table
    emb: range  # the unembedding's slice of D


@dataclasses.dataclass(frozen=True)
class Split:
    """A rank's slice [start, stop) of one weight dim: "out" columns, "in" rows or "expert"."""
    dim: str
    start: int
    stop: int


def _one_of(values: list[int]) -> str:
    *head, last = [str(v) for v in values]
    return f"{', '.join(head)} or {last}" if head else last


def _divisors(n: int) -> str:
    return _one_of([d for d in range(1, n + 1) if n % d == 0])


def _even(total: int, layout: Layout, what: str) -> range:
    if total % layout.size:
        raise ConfigError(f"--tp {layout.size} must divide {what}={total} "
                          f"(try {_divisors(total)})")
    n = total // layout.size
    return range(layout.rank * n, (layout.rank + 1) * n)


def local_shapes(config: GrokConfig, layout: Layout) -> LocalShapes:
    """What `layout.rank` holds; ConfigError when `layout.size` does not split the model."""
    R, K, G = layout.size, config.num_kv_heads, config.q_per_kv
    q_heads, kv_heads = range(config.num_q_heads), range(K)
    if layout.attn == "tp":
        fits = config.attention_tp_sizes
        if R not in fits:
            raise ConfigError(f"--tp {R} must divide num_kv_heads={K}, or be a multiple of it "
                              f"dividing num_q_heads={config.num_q_heads} (try {_one_of(fits)})")
        q_heads = _even(config.num_q_heads, layout, "num_q_heads")
        if R <= K:
            kv_heads = _even(K, layout, "num_kv_heads")
        else:  # more ranks than kv heads: each kv head replicated on R // K ranks
            kv = layout.rank // (R // K)
            kv_heads = range(kv, kv + 1)
        # query head n uses kv head n // G: a rank's query heads all use its kv heads
        assert kv_heads.start <= q_heads.start // G and (q_heads.stop - 1) // G < kv_heads.stop
    experts, ffn = range(config.num_experts), range(config.ffn_size)
    if layout.moe == "ep":
        experts = _even(config.num_experts, layout, "num_experts")
    elif layout.moe == "tp":
        ffn = _even(config.ffn_size, layout, "expert width ffn_size")
    vocab, emb = range(config.vocab_size), range(config.emb_size)
    if layout.unembed == "vocab":
        vocab = _even(config.vocab_size, layout, "vocab_size")
    elif layout.unembed == "dim":
        emb = _even(config.emb_size, layout, "emb_size")
    return LocalShapes(q_heads, kv_heads, experts, ffn, vocab, emb)


def plan(config: GrokConfig, layout: Layout) -> dict[str, Split]:
    """Module path within a decoder layer -> this rank's Split of its weight (and scales)."""
    s = local_shapes(config, layout)
    H = config.key_size
    q_cols = Split("out", s.q_heads.start * H, s.q_heads.stop * H)
    kv_cols = Split("out", s.kv_heads.start * H, s.kv_heads.stop * H)
    table = {"attn.wq": q_cols, "attn.wk": kv_cols, "attn.wv": kv_cols,
             "attn.wo": Split("in", q_cols.start, q_cols.stop)}
    if layout.moe == "ep":
        experts = Split("expert", s.experts.start, s.experts.stop)
        table.update({"moe.w_gate": experts, "moe.w_up": experts, "moe.w_down": experts})
    else:  # "none" gives the whole width
        f = s.ffn
        table.update({"moe.w_gate": Split("out", f.start, f.stop),
                      "moe.w_up": Split("out", f.start, f.stop),
                      "moe.w_down": Split("in", f.start, f.stop)})
    return table


# ---- slicing (shared with the sharded loader) ---------------------------------------------------

_WEIGHT_DIM = {"out": -1, "in": -2, "expert": 0}


def slice_weight(w: torch.Tensor, split: Split) -> torch.Tensor:
    """The rank's view of a weight [(E,) in, out] (int8 or float)."""
    return w.narrow(_WEIGHT_DIM[split.dim], split.start, split.stop - split.start)


def slice_scales(s: torch.Tensor, split: Split, d_in: int, name: str = "scales") -> torch.Tensor:
    """The rank's view of scales [(E,) G, out] for a weight with input dim `d_in`.

    Row splits keep the scale groups their rows fall in: 8 groups over 2 ranks gives 4 each;
    over 16 ranks each rank's rows lie inside one group. One group (G = 1) is kept whole.
    Raises ConfigError when a rank's rows cut across a group boundary.
    """
    if split.dim != "in":
        return s.narrow(_WEIGHT_DIM[split.dim], split.start, split.stop - split.start)
    G = s.shape[-2]
    if G == 1:
        return s
    block = d_in // G
    start, n = split.start, split.stop - split.start
    if n >= block and start % block == 0 and n % block == 0:
        return s.narrow(-2, start // block, n // block)
    if n < block and start // block == (split.stop - 1) // block:
        return s.narrow(-2, start // block, 1)
    raise ConfigError(f"{name}: rows {split.start}:{split.stop} of {d_in} cut across its {G} "
                      f"scale groups of {block} rows; choose a --tp that splits them evenly")


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that does not keep the full tensor's storage alive."""
    return t.clone(memory_format=torch.contiguous_format)


def shard_linear_(lin: Linear, split: Split, name: str) -> None:
    """Replace a Linear's weight (and scales) by this rank's slice, in place (meta works too)."""
    d_in = lin.weight.shape[-2]
    if split.start == 0 and split.stop == lin.weight.shape[_WEIGHT_DIM[split.dim]]:
        return  # whole: nothing to cut
    w = _owned(slice_weight(lin.weight, split))
    if isinstance(lin.weight, nn.Parameter):
        lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    else:
        lin.weight = w  # a registered buffer stays a buffer
    if lin.scales is not None:
        lin.scales = _owned(slice_scales(lin.scales, split, d_in, f"{name}.scales"))


def local_config(config: GrokConfig, layout: Layout) -> GrokConfig:
    """The config one rank's attention sees: its local query and kv head counts. Also what a
    KV cache for this rank is allocated from: `KVCache.allocate(local_config(...), B, S)`."""
    s = local_shapes(config, layout)
    return config.replace(num_q_heads=len(s.q_heads), num_kv_heads=len(s.kv_heads))


def shard_model_(model: Grok1, layout: Layout) -> Grok1:
    """Cut every decoder layer's matrices down to this rank's slices (no communication).

    The attention modules get the local head counts; the model records `model.parallel_layout`
    and `model.local_config`. On a meta model this only changes shapes (the loader fills them).
    """
    if getattr(model, "parallel_layout", None) is not None:
        raise ValueError(f"model is already sharded ({model.parallel_layout}); shard it once")
    table = plan(model.config, layout)
    attn_config = local_config(model.config, layout)
    for i, layer in enumerate(model.layers):
        for path, split in table.items():
            shard_linear_(layer.get_submodule(path), split, f"layers.{i}.{path}")
        layer.attn.config = attn_config
    model.parallel_layout = layout
    model.local_config = attn_config
    return model


# ---- applying a layout with its collectives ---------------------------------------------------

def matmul_partial(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 x @ bf16 w with the accumulator returned unrounded (a partial sum), in
    `wide_dtype`: f32 on GPUs, f64 on the CPU (so the sum over ranks, rounded once, is one
    process's value to the bit)."""
    if x.is_cuda and _cuda_mm_has_out_dtype():  # a bf16 GEMM writing f32: no f32 copy of w
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


class RowParallelLinear(Linear):
    """A Linear holding rows of W (a slice of the input dim): x_local @ W_local is a partial
    sum, kept in f32, all-reduced over `group` and rounded to bf16 once, as one process's
    matmul rounds once. (Rounding each rank's partial to bf16 before the sum, as SPEC 2.8
    guessed the reference does, moves the golden logits by 21 %: it is not what it does.)
    Swapped in as the module's class, so parameter names stay Linear's. On CUDA an int8 weight
    goes through grok1.ops.linear's kernel (`kernel_backed`: the engine leaves it in place)."""

    group: dist.ProcessGroup | None
    kernel_backed = True
    _kernel_ok: bool

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        if expert is not None:
            return all_reduce_(matmul_partial(x, self.dense(expert)), self.group).float().to(x.dtype)
        return self.partial_sums(x).float().to(x.dtype)

    def partial_sums(self, x: torch.Tensor) -> torch.Tensor:
        """The f32 sum over ranks, before its one rounding to bf16 (the engine's fused residual
        norm rounds it)."""
        from grok1.ops._triton import use_kernel

        if self._kernel_ok and use_kernel(x):
            from grok1.ops.linear import int8_linear

            x_MK = x.reshape(-1, x.shape[-1])
            partial = int8_linear(x_MK, self.weight, self.scales, out_dtype=torch.float32)
            partial = partial.view(*x.shape[:-1], -1)
        else:
            partial = matmul_partial(x, self.dense())
        return all_reduce_(partial, self.group)


def _row_parallel(lin: Linear, group: dist.ProcessGroup | None) -> None:
    from grok1.ops.linear import kernel_supported

    lin.__class__ = RowParallelLinear
    lin.group = group
    lin._kernel_ok = lin.quantized and lin.weight.dim() == 2 and kernel_supported(
        lin.weight.shape[0], lin.scales.shape[0])


class ParallelGrok1(Grok1):
    """Grok1 with a sharded unembedding; swapped in as the model's class by `parallelize`
    (as FSDP2's fully_shard does), so names, parameters and `isinstance` stay Grok1's."""

    tp_group: dist.ProcessGroup | None
    parallel_layout: Layout

    def unembed(self, h_BTD: torch.Tensor) -> torch.Tensor:
        layout = self.parallel_layout
        s = local_shapes(self.config, layout)
        if layout.unembed == "vocab":
            table_VD = self.embed[s.vocab.start:s.vocab.stop]  # a view: no copy of the table
            logits = (h_BTD @ table_VD.to(BF16).T) * self.output_multiplier
            return all_gather_last(logits, self.tp_group)
        if layout.unembed == "dim":
            d = slice(s.emb.start, s.emb.stop)
            partial = matmul_partial(h_BTD[..., d], self.embed[:, d].to(BF16).T)
            logits = all_reduce_(partial, self.tp_group).float().to(BF16)  # one rounding, as one process
            return logits * self.output_multiplier
        return super().unembed(h_BTD)


def parallelize(model: Grok1, group: dist.ProcessGroup | None, layout: Layout) -> Grok1:
    """Shard `model` in place for `layout` (unless a meta build was sharded already with the
    same layout) and add the collectives over `group`: an f32 all-reduce after attention's wo
    and after the MoE (expert.py), and the unembedding's gather (or all-reduce)."""
    from grok1.parallel.expert import install_moe_reduce  # expert.py builds on this file's table

    if group_size(group) != layout.size:
        raise ConfigError(f"layout of {layout.size} ranks on a group of {group_size(group)}")
    if getattr(model, "parallel_layout", None) is None:
        shard_model_(model, layout)
    elif model.parallel_layout != layout:
        raise ValueError(f"model was sharded for {model.parallel_layout}, not {layout}")
    s = local_shapes(model.config, layout)
    for layer in model.layers:
        if layout.attn == "tp":
            _row_parallel(layer.attn.wo, group)
        if layout.moe != "none":
            install_moe_reduce(layer.moe, s.experts, group)
    model.__class__ = ParallelGrok1
    model.tp_group = group
    return model


def apply_tp(model: Grok1, tp_group: dist.ProcessGroup | None, *, moe: str = "tp",
             unembed: str = "vocab") -> Grok1:
    """Tensor parallelism over `tp_group`: attention by heads, the MoE by expert width
    (`moe="tp"`) or by whole experts (`moe="ep"`), the unembedding by vocabulary or D.
    Works on a loaded model (slices it) or on a meta model before sharded loading."""
    layout = Layout(group_size(tp_group), 0 if tp_group is None else dist.get_rank(tp_group),
                    attn="tp", moe=moe, unembed=unembed)
    return parallelize(model, tp_group, layout)
