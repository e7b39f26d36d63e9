"""x @ W for quantized weights (int8, int4, fp8: grok1.quant.WeightFormat) with blockwise bf16
scales, without materialising the bf16 matrix.

Twin: `grok1.model.Linear.forward` (dequantize, then a bf16 matmul). The kernels dequantize each
K tile exactly as `quant.dequantize_as` and accumulate in f32; the output is rounded to bf16
once. Used for the attention projections (the experts go through grok1.ops.moe).
Shape letters: M rows, K input dim, N output dim, G scale groups.
"""

from __future__ import annotations

import torch

from grok1.model import PartialSums
from grok1.ops._triton import (
    NUM_SMS_GUESS,
    KernelWeights,
    cdiv,
    device_name,
    interpreting,
    k_tile,
    kernel_weights,
    loadable,
    use_kernel,
    weight_format_of,
)
from grok1.ops.tile_config import GemvTiles, LinearTiles, gemv_key, mm_key, nearest_rows, tuned
from grok1.quant import INT8, WeightFormat, dequantize_as


def linear_config(M: int, K: int, N: int, device: str) -> LinearTiles:
    """The tuned entry (configs/linear.json) nearest M, else defaults."""
    entry = nearest_rows(tuned("linear", device).get(mm_key(K, N), {}), M)
    if entry:
        return entry
    if M <= 64:  # memory-bound: split K until the grid covers the GPU about twice
        tiles = cdiv(N, 64)
        split = max(1, min(8, cdiv(2 * NUM_SMS_GUESS, tiles)))
        return LinearTiles(BM=16 if M <= 16 else 64, BN=64, BK=128, SPLIT=split, W=4)
    return LinearTiles()


def _kernel_weights(fmt: WeightFormat | None, w: torch.Tensor, s: torch.Tensor, K: int,
                    where: str) -> KernelWeights:
    """The kernels' view of a quantized [K, N] matrix (format named or implied by its dtype)."""
    fmt = weight_format_of(w, s, fmt, where)
    if fmt is None:
        raise ValueError(f"{where}: takes quantized weights with scales, found none")
    return kernel_weights(fmt, w, s, K, where)


def quant_linear(x_MK: torch.Tensor, w_KN: torch.Tensor, s_GN: torch.Tensor,
                 config: LinearTiles | dict | None = None,
                 out_dtype: torch.dtype = torch.bfloat16,
                 weights: WeightFormat | None = None) -> torch.Tensor:
    """bf16 [M, N] = x @ dequantize_as(weights, w, s) (Triton kernel); `out_dtype=torch.float32`
    returns the f32 accumulator unrounded (a tensor-parallel partial sum, summed across ranks
    first). `weights`: the format, by default the one w's dtype implies (int8, fp8; packed int4
    must name its `int4(group_size)`). `config`: the launch config instead of the tuned one (a
    dict: LinearTiles keys over its defaults; ConfigError if bad)."""
    M, K = x_MK.shape
    N = w_KN.shape[1]
    kw = _kernel_weights(weights, w_KN, s_GN, K, "quant_linear")
    if M == 1 and config is None:
        return _gemv(x_MK, [(w_KN, s_GN)], kw, out_dtype)[0]
    if isinstance(config, dict):
        config = LinearTiles.from_dict(config, "quant_linear(config=...)")
    cfg = config or linear_config(M, K, N, device_name(x_MK))
    bk = k_tile(kw.group_k, kw.num_groups, cfg.BK)
    if not bk:
        raise ValueError(f"quant_linear: K={K} in scale groups of {kw.group_k} inputs has no K "
                         f"tile >= 16 inside one group")
    from grok1.ops.linear_triton import linear_kernel
    split = cfg.SPLIT
    k_per_split = cdiv(K, split * bk) * bk  # whole K tiles per split
    split = cdiv(K, k_per_split)
    f32_out = out_dtype == torch.float32
    if split == 1 and not f32_out:
        out = torch.empty(M, N, dtype=torch.bfloat16, device=x_MK.device)
    else:
        out = torch.empty(split, M, N, dtype=torch.float32, device=x_MK.device)
    x = x_MK.contiguous()
    grid = (cdiv(M, cfg.BM), cdiv(N, cfg.BN), split)
    linear_kernel[grid](x, loadable(w_KN), s_GN, out, M, N, K, kw.group_k, kw.num_groups,
                        k_per_split, WFMT=kw.wfmt,
                        SPLIT=max(split, 2) if f32_out else split,  # SPLIT > 1 stores f32
                        BM=cfg.BM, BN=cfg.BN, BK=bk,
                        EVEN_K=k_per_split * split == K, F32=interpreting(),
                        num_warps=cfg.W, num_stages=cfg.S)
    if out.dtype == torch.bfloat16:
        return out
    return out.sum(0) if f32_out else out.sum(0).to(torch.bfloat16)


# ---- one row: GEMV (decode at batch 1), several matrices sharing x in one launch ------------

def gemv_config(K: int, Ns: list[int], device: str) -> GemvTiles:
    """The tuned entry for these shapes (bench/linear.py), else GemvTiles' defaults."""
    return nearest_rows(tuned("linear", device).get(gemv_key(K, Ns), {}), 1) or GemvTiles()


def quant_gemv(x_1K: torch.Tensor, mats: list[tuple[torch.Tensor, torch.Tensor]],
               out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
               reduce: bool = True, weights: WeightFormat | None = None) -> list[torch.Tensor]:
    """[x @ dequantize_as(weights, w, s) for (w, s) in mats] for one row x [1, K], in one launch
    per three matrices (all of one format, with the same K and scale groups): each [1, N_i],
    bf16 (or the f32 sums unrounded with `out_dtype=torch.float32`). `reduce=False`: each the
    f32 partial sums of the K splits, [S, 1, N_i], for a consumer that sums them itself (saves
    two launches: the sum and the rounding). `weights` as quant_linear's. `config`: GemvTiles
    keys over the tuned config (ConfigError if bad)."""
    K = x_1K.shape[1]
    kws = {_kernel_weights(weights, w, s, K, f"quant_gemv: matrix {i}")
           for i, (w, s) in enumerate(mats)}
    if len(kws) != 1:
        raise ValueError(f"quant_gemv: matrices need one format and scale grouping, found "
                         f"{sorted(kws, key=str)}")
    return _gemv(x_1K, mats, kws.pop(), out_dtype, config, reduce)


def _gemv(x_1K: torch.Tensor, mats: list[tuple[torch.Tensor, torch.Tensor]], kw: KernelWeights,
          out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
          reduce: bool = True) -> list[torch.Tensor]:
    """quant_gemv for matrices already checked to be read as `kw`."""
    K = x_1K.shape[1]
    cfg = GemvTiles.from_dict(config or {}, "quant_gemv(config=...)",
                              base=gemv_config(K, [w.shape[1] for w, _ in mats], device_name(x_1K)))
    from grok1.ops.linear_triton import gemv3_kernel
    if len(mats) > 3:
        return (_gemv(x_1K, mats[:3], kw, out_dtype, config, reduce)
                + _gemv(x_1K, mats[3:], kw, out_dtype, config, reduce))
    BN, BK = cfg.BN, cfg.BK
    G, group_k = kw.num_groups, kw.group_k
    mma = bool(cfg.MMA) and k_tile(group_k, G, BK) > 0  # tl.dot takes K tiles of 16 and up
    BK = k_tile(group_k, G, BK, at_least=16 if mma else 1)
    Ns = [w.shape[1] for w, _ in mats] + [0] * (3 - len(mats))
    tiles = [cdiv(n, BN) for n in Ns]
    want = max(1, cdiv(cfg.PROGRAMS, sum(tiles)))
    want = 1 << (want.bit_length() - 1)  # a power of two: splits that divide K evenly
    if G > 1:  # whole scale groups per split
        per = cdiv(G, min(want, G))
        k_per_split, chunk = per * group_k, group_k
    else:
        k_per_split = cdiv(K, want * BK) * BK  # whole BK tiles per split
        chunk = k_per_split
    split = cdiv(K, k_per_split)
    N_total = sum(Ns)
    out = torch.empty(split, N_total, dtype=torch.float32, device=x_1K.device)
    w = [loadable(m[0]) for m in mats] + [loadable(mats[0][0])] * (3 - len(mats))
    s = [m[1] for m in mats] + [mats[0][1]] * (3 - len(mats))
    gemv3_kernel[(sum(tiles), split)](
        x_1K.contiguous(), w[0], s[0], w[1], s[1], w[2], s[2], out, K, Ns[0], Ns[1], Ns[2],
        tiles[0], tiles[1], N_total, group_k, chunk, k_per_split, WFMT=kw.wfmt, BN=BN, BK=BK,
        EVEN_K=split * k_per_split == K and chunk % BK == 0,
        DEQUANT=cfg.DEQUANT, MMA=mma, F32=interpreting(), num_warps=cfg.W,
        num_stages=cfg.S)
    if not reduce:
        return [part[:, None] for part in out.split(Ns[:len(mats)], dim=1)]
    total = out.sum(0, keepdim=True) if split > 1 else out
    if out_dtype != torch.float32:
        total = total.to(out_dtype)
    return list(total.split(Ns[:len(mats)], dim=1))


def project_many(x_MK: torch.Tensor, linears: list[torch.nn.Module]
                 ) -> list[torch.Tensor | PartialSums]:
    """[lin(x) for lin in linears]; for one row and kernel-backed Linears of one format sharing
    K and the scale grouping (q/k/v; or wo alone), one GEMV launch reads all the weights and
    each output is the PartialSums [S, 1, N_i] of its K splits, for a consumer that sums them
    (grok1.ops.rope, grok1.ops.rmsnorm): no launches to sum and round."""
    if (x_MK.shape[0] == 1 and use_kernel(x_MK) and all(type(m) is QuantLinear for m in linears)
            and len({m.kernel for m in linears}) == 1):
        parts = _gemv(x_MK, [(m.weight, m.scales) for m in linears], linears[0].kernel,
                      reduce=False)
        return [PartialSums(p) for p in parts]
    return [m(x_MK) for m in linears]


def kernel_supported(K: int, G: int, weights: WeightFormat = INT8) -> bool:
    """Whether the kernels can tile an input dim K in G scale groups of format `weights`."""
    group_k = weights.group_size if weights.name == "int4" else K // G
    return (weights.name == "int4" or K % G == 0) and bool(k_tile(group_k, G, 128))


class QuantLinear(torch.nn.Module):
    """Drop-in for a quantized model.Linear of any format (int8, int4, fp8; same `weight` /
    `scales` buffers, same names), through the kernels on a GPU, else the twin."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.register_buffer("weight", linear.weight)  # the same tensors, the same names
        self.register_buffer("scales", linear.scales)
        self._weights = linear.weights
        self.kernel = kernel_weights(self._weights, self.weight, self.scales,
                                     input_dim(self._weights, self.weight), "QuantLinear")
        self.kernel_ok = bool(k_tile(self.kernel.group_k, self.kernel.num_groups, 128))

    @property
    def quantized(self) -> bool:
        """Int8 as released (model.Linear's meaning: what the int8-only paths take)."""
        return self._weights == INT8

    @property
    def weights(self) -> WeightFormat:
        """The weight format, as model.Linear's (Grok1.weights reads it)."""
        return self._weights

    def dense(self) -> torch.Tensor:
        return dequantize_as(self._weights, self.weight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.kernel_ok and use_kernel(x)):
            return x @ self.dense()  # the twin: model.Linear.forward
        lead = x.shape[:-1]
        return quant_linear(x.reshape(-1, x.shape[-1]), self.weight, self.scales,
                            weights=self._weights).view(*lead, -1)


def input_dim(fmt: WeightFormat, weight: torch.Tensor) -> int:
    """K of a stored [K, N] weight (int4 stores K / 2 rows of packed pairs)."""
    return weight.shape[0] * 2 if fmt.name == "int4" else weight.shape[0]
