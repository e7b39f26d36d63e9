"""Sharding as data: which slice of each matrix a tensor-parallel rank holds.

`Layout` is one rank's place among the ranks and how each part of the model is split; `plan`
maps it to a Split per decoder-layer matrix, `local_shapes` to the global ids a rank holds and
`local_config` to the head counts its attention and KV cache see. A model declares its layout
(`Grok1.layout`); grok1.parallel cuts the tensors and adds the collectives, the sharded loaders
read exactly these slices. Pure data: no torch, so command lines can validate a layout at once.
"""

from __future__ import annotations

import dataclasses

from grok1.config import ConfigError, GrokConfig

MOE_SPLITS = ("tp", "ep")  # each expert's width over the ranks, or whole experts per rank
UNEMBED_SPLITS = ("vocab", "dim")  # rows of the output table (logits gathered), or D (all-reduced)
ATTN_MODES = ("tp", "none")
MOE_MODES = (*MOE_SPLITS, "none")  # "none": unsplit (the options offer the splits alone)
UNEMBED_MODES = (*UNEMBED_SPLITS, "none")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One rank's place among `size` ranks, and how each part of the model is split over them
    ("none": kept whole on every rank)."""
    size: int = 1
    rank: int = 0
    attn: str = "tp"  # "tp": query and kv heads split (and Grok-2's dense MLP by its width)
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
    global). Ranges index heads, experts, expert-width columns, the dense MLP's width (Grok-2),
    vocabulary rows and D."""
    q_heads: range
    kv_heads: range
    experts: range
    ffn: range
    dense: range  # Grok-2's dense MLP width columns (empty: no dense MLP)
    vocab: range  # the unembedding's rows of the output table (tied, or Grok-2's lm_head)
    emb: range  # the unembedding's slice of D


@dataclasses.dataclass(frozen=True)
class Split:
    """A rank's slice [start, stop) of one weight dim: "out" columns, "in" rows or "expert"."""
    dim: str
    start: int
    stop: int

    @property
    def weight_dim(self) -> int:
        """The dim it cuts of a weight [(E,) in, out] (and of its scales [(E,) G, out])."""
        return {"out": -1, "in": -2, "expert": 0}[self.dim]


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
    # the dense MLP (Grok-2) is split with the attention, Megatron's MLP split: its gate and up
    # by columns, its down by rows; whole on every rank when attention is
    dense = range(config.dense_width)
    if layout.attn == "tp" and config.dense_width:
        dense = _even(config.dense_width, layout, "dense_width")
    return LocalShapes(q_heads, kv_heads, experts, ffn, dense, vocab, emb)


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
    if config.residual_moe:
        d = s.dense
        table.update({"mlp.w_gate": Split("out", d.start, d.stop),
                      "mlp.w_up": Split("out", d.start, d.stop),
                      "mlp.w_down": Split("in", d.start, d.stop)})
    return table


def head_split(config: GrokConfig, layout: Layout) -> Split | None:
    """This rank's Split of an untied output head (`lm_head`, [D, V]: Grok-2's), or None when
    the rank holds it whole or the head is the tied embedding (which stays whole: the input
    lookup needs every row, and the unembedding slices a view of it)."""
    if config.tied_embeddings or layout.unembed == "none":
        return None
    s = local_shapes(config, layout)
    if layout.unembed == "vocab":
        return Split("out", s.vocab.start, s.vocab.stop)
    return Split("in", s.emb.start, s.emb.stop)


def local_config(config: GrokConfig, layout: Layout) -> GrokConfig:
    """The config one rank's attention sees: its local query and kv head counts. Also what a
    KV cache for this rank is allocated from: `KVCache.allocate(local_config(...), B, S)`."""
    s = local_shapes(config, layout)
    return config.replace(num_q_heads=len(s.q_heads), num_kv_heads=len(s.kv_heads))
