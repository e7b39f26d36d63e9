"""x @ W for int8 weights with blockwise bf16 scales, without materialising the bf16 matrix.

Twin: `grok1.model.Linear.forward` (dequantize, then a bf16 matmul). The kernel dequantizes each
K tile exactly as `quant.dequantize` and accumulates in f32; the output is rounded to bf16 once.
Used for the attention projections (the experts go through grok1.ops.moe).
Shape letters: M rows, K input dim, N output dim, G scale groups.
"""

from __future__ import annotations

import torch

from grok1.model import PartialSums
from grok1.ops._triton import NUM_SMS_GUESS, cdiv, device_name, interpreting, k_tile, use_kernel
from grok1.ops.tile_config import GemvTiles, LinearTiles, gemv_key, mm_key, nearest_rows, tuned
from grok1.quant import INT8, WeightFormat, dequantize


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


def int8_linear(x_MK: torch.Tensor, w_KN: torch.Tensor, s_GN: torch.Tensor,
                config: LinearTiles | dict | None = None,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """bf16 [M, N] = x @ dequantize(w, s) (Triton kernel); `out_dtype=torch.float32` returns
    the f32 accumulator unrounded (a tensor-parallel partial sum, summed across ranks first).
    `config`: the launch config instead of the tuned one (a dict: LinearTiles keys over its
    defaults; ConfigError if bad)."""
    M, K = x_MK.shape
    N = w_KN.shape[1]
    G = s_GN.shape[0]
    if M == 1 and config is None and gemv_supported(K, G):
        return int8_gemv(x_MK, [(w_KN, s_GN)], out_dtype)[0]
    if isinstance(config, dict):
        config = LinearTiles.from_dict(config, "int8_linear(config=...)")
    cfg = config or linear_config(M, K, N, device_name(x_MK))
    bk = k_tile(K // G, G, cfg.BK)
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
    linear_kernel[grid](x, w_KN, s_GN, out, M, N, K, K // G, G, k_per_split, QUANT=True,
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


def gemv_supported(K: int, G: int) -> bool:
    return K % G == 0


def int8_gemv(x_1K: torch.Tensor, mats: list[tuple[torch.Tensor, torch.Tensor]],
              out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
              reduce: bool = True) -> list[torch.Tensor]:
    """[x @ dequantize(w, s) for (w, s) in mats] for one row x [1, K], in one launch per three
    matrices (all with the same K and number of scale groups G): each [1, N_i], bf16 (or the
    f32 sums unrounded with `out_dtype=torch.float32`). `reduce=False`: each the f32 partial
    sums of the K splits, [S, 1, N_i], for a consumer that sums them itself (saves two
    launches: the sum and the rounding). `config`: GemvTiles keys over the tuned config
    (ConfigError if bad)."""
    K = x_1K.shape[1]
    cfg = GemvTiles.from_dict(config or {}, "int8_gemv(config=...)",
                              base=gemv_config(K, [w.shape[1] for w, _ in mats], device_name(x_1K)))
    from grok1.ops.linear_triton import gemv3_kernel
    G = mats[0][1].shape[0]
    if any(w.shape[0] != K or s.shape[0] != G for w, s in mats):
        raise ValueError(f"int8_gemv: matrices need K={K} rows and {G} scale groups, found "
                         f"{[(tuple(w.shape), s.shape[0]) for w, s in mats]}")
    if len(mats) > 3:
        return (int8_gemv(x_1K, mats[:3], out_dtype, config, reduce)
                + int8_gemv(x_1K, mats[3:], out_dtype, config, reduce))
    BN, BK = cfg.BN, cfg.BK
    group_k = K // G
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
    w = [m[0] for m in mats] + [mats[0][0]] * (3 - len(mats))
    s = [m[1] for m in mats] + [mats[0][1]] * (3 - len(mats))
    gemv3_kernel[(sum(tiles), split)](
        x_1K.contiguous(), w[0], s[0], w[1], s[1], w[2], s[2], out, K, Ns[0], Ns[1], Ns[2],
        tiles[0], tiles[1], N_total, group_k, chunk, k_per_split, BN=BN, BK=BK,
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
    """[lin(x) for lin in linears]; for one row and int8 kernel-backed Linears sharing K and
    the scale grouping (q/k/v; or wo alone), one GEMV launch reads all the weights and each
    output is the PartialSums [S, 1, N_i] of its K splits, for a consumer that sums them
    (grok1.ops.rope, grok1.ops.rmsnorm): no launches to sum and round."""
    if (x_MK.shape[0] == 1 and use_kernel(x_MK) and all(type(m) is Int8Linear for m in linears)
            and len({(m.weight.shape[0], m.scales.shape[0]) for m in linears}) == 1
            and gemv_supported(linears[0].weight.shape[0], linears[0].scales.shape[0])):
        parts = int8_gemv(x_MK, [(m.weight, m.scales) for m in linears], reduce=False)
        return [PartialSums(p) for p in parts]
    return [m(x_MK) for m in linears]


def kernel_supported(K: int, G: int) -> bool:
    return K % G == 0 and bool(k_tile(K // G, G, 128))


class Int8Linear(torch.nn.Module):
    """Drop-in for a quantized model.Linear (same `weight`/`scales` buffers, same names)."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.register_buffer("weight", linear.weight)  # the same tensors, the same names
        self.register_buffer("scales", linear.scales)
        self.kernel_ok = kernel_supported(linear.weight.shape[0], linear.scales.shape[0])

    @property
    def quantized(self) -> bool:
        return True

    @property
    def weights(self) -> WeightFormat:
        """The weight format, as model.Linear's (Grok1.weights reads it)."""
        return INT8

    def dense(self) -> torch.Tensor:
        return dequantize(self.weight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.kernel_ok and use_kernel(x)):
            return x @ self.dense()  # the twin: model.Linear.forward
        lead = x.shape[:-1]
        return int8_linear(x.reshape(-1, x.shape[-1]), self.weight, self.scales).view(*lead, -1)
