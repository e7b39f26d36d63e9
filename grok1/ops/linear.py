"""x @ W for int8 weights with blockwise bf16 scales, without materialising the bf16 matrix.

Twin: `grok1.model.Linear.forward` (dequantize, then a bf16 matmul). The kernel dequantizes each
K tile exactly as `quant.dequantize` and accumulates in f32; the output is rounded to bf16 once.
Used for the attention projections (the experts go through grok1.ops.moe).
Shape letters: M rows, K input dim, N output dim, G scale groups.
"""

from __future__ import annotations

import torch

from grok1.model import PartialSums
from grok1.ops._triton import cdiv, device_name, interpreting, load_tuned, nearest_m, use_kernel
from grok1.quant import dequantize

NUM_SMS_GUESS = 132


def linear_config(M: int, K: int, N: int, device: str) -> dict:
    tuned = nearest_m(load_tuned("linear", device).get(f"K{K}_N{N}", {}), M)
    if tuned:
        return dict(tuned)
    if M <= 64:  # memory-bound: split K until the grid covers the GPU about twice
        tiles = cdiv(N, 64)
        split = max(1, min(8, cdiv(2 * NUM_SMS_GUESS, tiles)))
        return {"BM": 16 if M <= 16 else 64, "BN": 64, "BK": 128, "SPLIT": split, "W": 4, "S": 4}
    return {"BM": 128, "BN": 128, "BK": 64, "SPLIT": 1, "W": 8, "S": 4}


def _tile_k(K: int, G: int, want: int) -> int:
    bk = want
    while bk >= 16:
        if G == 1 or (K // G) % bk == 0:
            return bk
        bk //= 2
    return 0


def int8_linear(x_MK: torch.Tensor, w_KN: torch.Tensor, s_GN: torch.Tensor,
                config: dict | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """bf16 [M, N] = x @ dequantize(w, s) (Triton kernel); `out_dtype=torch.float32` returns
    the f32 accumulator unrounded (a tensor-parallel partial sum, summed across ranks first)."""
    M, K = x_MK.shape
    N = w_KN.shape[1]
    G = s_GN.shape[0]
    if M == 1 and config is None and gemv_supported(K, G):
        return int8_gemv(x_MK, [(w_KN, s_GN)], out_dtype)[0]
    cfg = dict(config or linear_config(M, K, N, device_name(x_MK)))
    bk = _tile_k(K, G, cfg["BK"])
    from grok1.ops.linear_triton import linear_kernel
    split = cfg["SPLIT"]
    k_per_split = cdiv(K, split * bk) * bk  # whole K tiles per split
    split = cdiv(K, k_per_split)
    f32_out = out_dtype == torch.float32
    if split == 1 and not f32_out:
        out = torch.empty(M, N, dtype=torch.bfloat16, device=x_MK.device)
    else:
        out = torch.empty(split, M, N, dtype=torch.float32, device=x_MK.device)
    x = x_MK.contiguous()
    grid = (cdiv(M, cfg["BM"]), cdiv(N, cfg["BN"]), split)
    linear_kernel[grid](x, w_KN, s_GN, out, M, N, K, K // G, G, k_per_split, QUANT=True,
                        SPLIT=max(split, 2) if f32_out else split,  # SPLIT > 1 stores f32
                        BM=cfg["BM"], BN=cfg["BN"], BK=bk,
                        EVEN_K=k_per_split * split == K, F32=interpreting(),
                        num_warps=cfg["W"], num_stages=cfg["S"])
    if out.dtype == torch.bfloat16:
        return out
    return out.sum(0) if f32_out else out.sum(0).to(torch.bfloat16)


# ---- one row: GEMV (decode at batch 1), several matrices sharing x in one launch ------------
# PROGRAMS: about how many (column tile, K split) programs to launch; the K split follows.
# DEQUANT: which instructions compute bf16(w * s) (ops/dot_triton.dequant_f32; same values).
GEMV_CONFIG = {"BN": 128, "BK": 32, "W": 4, "PROGRAMS": 4 * NUM_SMS_GUESS, "DEQUANT": 2}


def gemv_key(K: int, Ns: list[int]) -> str:
    """configs/linear.json key of a GEMV launch: "gemv_K6144_N6144_1024_1024" (q/k/v)."""
    return f"gemv_K{K}_N{'_'.join(map(str, Ns))}"


def gemv_config(K: int, Ns: list[int], device: str) -> dict:
    """GEMV_CONFIG overridden by the tuned entry for these shapes (bench/linear.py), if any."""
    tuned = load_tuned("linear", device).get(gemv_key(K, Ns), {})
    return {**GEMV_CONFIG, **tuned}


def gemv_supported(K: int, G: int) -> bool:
    return K % G == 0


def int8_gemv(x_1K: torch.Tensor, mats: list[tuple[torch.Tensor, torch.Tensor]],
              out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
              reduce: bool = True) -> list[torch.Tensor]:
    """[x @ dequantize(w, s) for (w, s) in mats] for one row x [1, K], in one launch per three
    matrices (all with the same K and number of scale groups G): each [1, N_i], bf16 (or the
    f32 sums unrounded with `out_dtype=torch.float32`). `reduce=False`: each the f32 partial
    sums of the K splits, [S, 1, N_i], for a consumer that sums them itself (saves two
    launches: the sum and the rounding)."""
    from grok1.ops.linear_triton import gemv3_kernel
    K = x_1K.shape[1]
    cfg = {**gemv_config(K, [w.shape[1] for w, _ in mats], device_name(x_1K)), **(config or {})}
    G = mats[0][1].shape[0]
    if any(w.shape[0] != K or s.shape[0] != G for w, s in mats):
        raise ValueError(f"int8_gemv: matrices need K={K} rows and {G} scale groups, found "
                         f"{[(tuple(w.shape), s.shape[0]) for w, s in mats]}")
    if len(mats) > 3:
        return (int8_gemv(x_1K, mats[:3], out_dtype, config, reduce)
                + int8_gemv(x_1K, mats[3:], out_dtype, config, reduce))
    BN, BK = cfg["BN"], cfg["BK"]
    group_k = K // G
    while BK > 1 and G > 1 and group_k % BK:
        BK //= 2
    Ns = [w.shape[1] for w, _ in mats] + [0] * (3 - len(mats))
    tiles = [cdiv(n, BN) for n in Ns]
    want = max(1, cdiv(cfg["PROGRAMS"], sum(tiles)))
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
        DEQUANT=cfg.get("DEQUANT", GEMV_CONFIG["DEQUANT"]), num_warps=cfg["W"])
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
    return K % G == 0 and bool(_tile_k(K, G, 128))


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

    def dense(self) -> torch.Tensor:
        return dequantize(self.weight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.kernel_ok and use_kernel(x)):
            return x @ self.dense()  # the twin: model.Linear.forward
        lead = x.shape[:-1]
        return int8_linear(x.reshape(-1, x.shape[-1]), self.weight, self.scales).view(*lead, -1)
