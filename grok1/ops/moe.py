"""Fused MoE: only the selected experts run, as grouped GEMMs over pairs sorted by expert.

Twin: `grok1.model.moe_ref` (the same math expert by expert). Contract (vLLM's fused_moe, redone):
- align: the P = M*A (token, slot) pairs are sorted by expert; each expert's run is padded to
  BM rows with the sentinel P, so one launch serves every expert; block_expert[b] names the
  expert of block b (-1 past the end). Static sizes, no host sync: CUDA graphs capture it.
- gate/up: h[p] = gelu(bf16(x[p // A] @ Wg[e])) * bf16(x[p // A] @ Wu[e]), stored f32 [P, F].
- down: out[p] = gate[p] * (h[p] @ Wd[e]) in f32 [SPLIT, P, D]; the slots (and K splits) are
  summed in f32 and rounded to bf16 once, as the reference's f32 accumulation.
Quantized weights (int8, int4, fp8: grok1.quant.WeightFormat) are dequantized exactly as
`quant.dequantize_as` (bf16(w * s)), one kernel family for every format; the matmuls accumulate
in f32 and h stays f32 into the down-projection, as the reference (the tensor cores take it as
two bf16 halves). The remaining departure from the twin is the f32 summation order (GELU's
tanh is libdevice's, as torch's).

Shape letters: M tokens, A selected experts, P pairs, D emb_size, F expert width, E experts,
G scale groups.
"""

from __future__ import annotations

import dataclasses

import torch

from grok1.model import PartialSums, moe_ref
from grok1.ops._triton import (
    KernelWeights,
    cdiv,
    device_name,
    interpreting,
    k_tile,
    kernel_weights,
    loadable,
    next_pow2,
    use_kernel,
    weight_format_of,
)
from grok1.ops.tile_config import MoeTiles, moe_key, nearest_rows, tuned
from grok1.quant import WeightFormat


def moe_align_ref(ids_MA: torch.Tensor, num_experts: int, block_m: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of the align kernel: (sorted_ids [S] int32, block_expert [S/BM] int32);
    pairs with an id outside 0..E-1 (-1: held by another rank) are left out."""
    flat = ids_MA.reshape(-1).long()
    P = flat.numel()
    num_slots = _num_slots(P, num_experts, block_m)
    kept = (flat >= 0) & (flat < num_experts)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat.clamp(0, num_experts - 1), kept.long())
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.sort(torch.where(kept, flat, num_experts), stable=True).indices
    order = order[:int(kept.sum())]  # the dropped pairs sort last
    sorted_e = flat[order]
    rank = torch.arange(order.numel(), device=flat.device) - (counts.cumsum(0) - counts)[sorted_e]
    sorted_ids = torch.full((num_slots,), P, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[sorted_e] + rank] = order.int()
    block_start = torch.arange(0, num_slots, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert >= num_experts, -1, block_expert).int()
    return sorted_ids, block_expert


def _num_slots(P: int, E: int, block_m: int) -> int:
    return cdiv(P + E * (block_m - 1), block_m) * block_m


def moe_align(ids_MA: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_kernel(ids_MA):
        return moe_align_ref(ids_MA, num_experts, block_m)
    from grok1.ops.moe_triton import moe_align_kernel
    P = ids_MA.numel()
    num_slots = _num_slots(P, num_experts, block_m)
    sorted_ids = torch.empty(num_slots, dtype=torch.int32, device=ids_MA.device)
    block_expert = torch.empty(num_slots // block_m, dtype=torch.int32, device=ids_MA.device)
    ids = ids_MA.reshape(-1).contiguous()  # int32 or int64: the kernel loads either
    moe_align_kernel[(1,)](ids, sorted_ids, block_expert, P, num_slots, num_slots // block_m,
                           E=num_experts, E_PAD=next_pow2(num_experts, at_least=2),
                           BM=block_m, CHUNK=1024, num_warps=4)
    return sorted_ids, block_expert


# ---- launch configs ----------------------------------------------------------------------

def moe_config(P: int, D: int, F: int, E: int, dtype: str, device: str) -> MoeTiles:
    """Launch config for P pairs: the tuned entry (configs/moe.json) nearest P, else defaults.
    Tables are keyed by shape and weight dtype ("bf16", "int8", "int4", "fp8"); one tuned at
    another expert count E (an expert-parallel rank holds E/ranks whole experts) serves when
    this E has none. The defaults' K tiles (128, 64 for the GEMVs) fit any scale group of a
    multiple of 128 inputs (int4's default group; narrower groups get narrower tiles, k_tile)."""
    tables = tuned("moe", device)
    table = tables.get(moe_key(D, F, E, dtype)) or next(
        (t for k, t in tables.items() if k.startswith(f"moe_D{D}_F{F}_E") and k.endswith(dtype)),
        {})
    entry = nearest_rows(table, P)
    if entry and min(max(rows, P) / min(rows, P) for rows in table) <= 4:
        return entry  # (a table tuned only at decode sizes says nothing of prefill's)
    if P <= 2:  # batch-1 decode: the GEMV path on the tensor cores (bench/NOTES.md)
        return MoeTiles(GEMV=2, MAGIC=1, GMMA=1, GBK1=64, GS1=4, GBK2=64, GS2=4, GSPLIT=4)
    if P <= 64:  # decode: memory-bound; narrow tiles, many programs, K split for the down GEMM
        return MoeTiles()
    if P <= 512:
        return MoeTiles(BM=32, BN1=128, SPLIT=2)
    return MoeTiles(BM=64, BN1=128, BK1=64, W1=8, BN2=128, BK2=64, W2=8, SPLIT=1, I4PAIR=0)


# ---- the op ------------------------------------------------------------------------------

def fused_moe(x_MD: torch.Tensor, gates_MA: torch.Tensor, ids_MA: torch.Tensor,
              wg_EDF: torch.Tensor, sg_EGF: torch.Tensor | None,
              wu_EDF: torch.Tensor, su_EGF: torch.Tensor | None,
              wd_EFD: torch.Tensor, sd_EGD: torch.Tensor | None,
              config: MoeTiles | dict | None = None, out_dtype: torch.dtype | None = None,
              reduce: bool = True, exact_int8_products: bool = False, gelu: str = "tanh",
              rounding: str = "jax", weights: WeightFormat | None = None,
              has_dropped: bool = False) -> torch.Tensor:
    """bf16 [M, D]: sum over slots a of gates[m, a] * expert ids[m, a] (x[m]) (Triton kernels).
    `out_dtype=torch.float32` keeps the f32 sum unrounded (a partial sum across ranks);
    `reduce=False` returns the f32 terms [S, M, A, D] (K splits x slots) unsummed, for a
    consumer that sums them (grok1.ops.rmsnorm.add_rms_norm).

    Weights quantized with bf16 scales (all three in one format) or bf16 (scales None),
    dequantized as the reference, bf16(w * s). `weights`: their grok1.quant.WeightFormat, by
    default the one their dtype implies (int8, fp8); packed int4 (uint8) must name it
    (`int4(group_size)`). `exact_int8_products` (an explicit opt-in for int8 weights only,
    ValueError for another format; a different numerics: bench/moe_numerics.py) has the
    grouped GEMM multiply the int8 values themselves and scale each group's f32 sum instead; no
    tuning table can select it. `config`: the launch config instead of the tuned one (a dict:
    MoeTiles keys over MoeTiles' defaults; ConfigError if bad).
    `gelu` "tanh" (the reference's) or "erf", `rounding` "jax" or "sglang": as model.moe_ref's
    (Grok-2's config: exact GELU; SGLang's f32 gates, bf16 GELU product, and each slot's output
    rounded to bf16 before the slots add, which `reduce` does here and a consumer of the
    unreduced terms must do too). `has_dropped`: ids may hold -1, pairs computed elsewhere (an
    expert-parallel rank's remote experts), which add 0; the grouped GEMMs skip them.
    """
    if gelu not in ("tanh", "erf") or rounding not in ("jax", "sglang"):
        raise ValueError(f"fused_moe: gelu={gelu!r}, rounding={rounding!r}: expected "
                         "'tanh'|'erf' and 'jax'|'sglang'")
    math = dict(ERF=gelu == "erf", SGLANG=rounding == "sglang")
    M, D = x_MD.shape
    A = ids_MA.shape[1]
    E, _, F = wg_EDF.shape
    P = M * A
    fmt = weight_format_of(wg_EDF, sg_EGF, weights, "fused_moe")
    kw_in = [kernel_weights(fmt, w, s, D, f"fused_moe: {name}")
             for name, w, s in (("w_gate", wg_EDF, sg_EGF), ("w_up", wu_EDF, su_EGF))]
    kw_down = kernel_weights(fmt, wd_EFD, sd_EGD, F, "fused_moe: w_down")
    if kw_in[0] != kw_in[1]:
        raise ValueError(f"fused_moe: w_gate and w_up differ in scale groups: {kw_in}")
    if exact_int8_products and fmt is not None and fmt.name != "int8":
        raise ValueError(f"fused_moe: exact_int8_products takes int8 weights, not {fmt.label()}")
    wg_EDF, wu_EDF, wd_EFD = loadable(wg_EDF), loadable(wu_EDF), loadable(wd_EFD)
    if isinstance(config, dict):
        config = MoeTiles.from_dict(config, "fused_moe(config=...)")
    cfg = config or moe_config(P, D, F, E, kw_in[0].dtype, device_name(x_MD))
    if P <= cfg.GEMV:
        if has_dropped:  # a pair or two: run them as expert 0 with gate 0 (they add 0)
            kept_MA = ids_MA >= 0
            ids_MA = torch.where(kept_MA, ids_MA, 0)
            gates_MA = torch.where(kept_MA, gates_MA, 0.0)
        out = _fused_moe_gemv(x_MD, gates_MA, ids_MA, wg_EDF, sg_EGF, wu_EDF, su_EGF, wd_EFD,
                              sd_EGD, cfg, math, kw_in[0], kw_down)
    else:
        out = _fused_moe_mma(x_MD, gates_MA, ids_MA, wg_EDF, sg_EGF, wu_EDF, su_EGF, wd_EFD,
                             sd_EGD, cfg, math, kw_in[0], kw_down,
                             late=exact_int8_products and fmt is not None, zeros=has_dropped)
    if not reduce:
        return out
    if rounding == "sglang" and out_dtype is None:
        return sum_slots_sglang(out, x_MD.dtype)
    return out.sum(dim=(0, 2)).to(out_dtype or x_MD.dtype)


def sum_slots_sglang(terms_SMAD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[M, D] from the f32 terms: each slot's sum over the K splits rounded to `dtype`, then
    the slots added in it (SGLang's y_1 + y_2; model.moe_ref's per-slot sum)."""
    per_slot = terms_SMAD.sum(0).to(dtype)
    out = per_slot[:, 0]
    for a in range(1, per_slot.shape[1]):
        out = out + per_slot[:, a]
    return out


def _fused_moe_mma(x_MD, gates_MA, ids_MA, wg_EDF, sg_EGF, wu_EDF, su_EGF, wd_EFD, sd_EGD,
                   cfg: MoeTiles, math: dict, kw1: KernelWeights, kw2: KernelWeights,
                   late: bool, zeros: bool = False) -> torch.Tensor:
    """The grouped-GEMM path: f32 terms [S, M, A, D]; `zeros`: the terms start at 0 (pairs
    left out by moe_align are never written)."""
    M, D = x_MD.shape
    A = ids_MA.shape[1]
    E, _, F = wg_EDF.shape
    P = M * A
    quant = kw1.wfmt != 0
    # int4 tiles are two MMAs of BK / 2 rows (the bytes' low and high nibbles): tl.dot's 16
    pair = kw1.wfmt == 2 and bool(cfg.I4PAIR)
    min_bk = 32 if pair else 16
    bk1 = k_tile(kw1.group_k, kw1.num_groups, cfg.BK1, min_bk)
    bk2 = k_tile(kw2.group_k, kw2.num_groups, cfg.BK2, min_bk)
    if not bk1 or not bk2:
        raise ValueError(f"fused_moe: D={D}, F={F} in scale groups of {kw1.group_k}/"
                         f"{kw2.group_k} inputs have no K tile >= {min_bk} inside one group; "
                         "use moe_ref")
    from grok1.ops.moe_triton import moe_down_kernel, moe_gate_up_kernel
    if not quant and cfg.BK1 * cfg.BN1 * cfg.S1 > 128 * 128 * 2:
        cfg = dataclasses.replace(cfg, S1=2)  # bf16 tiles are twice int8's bytes: fit shared memory
    BM = cfg.BM
    x_MD = x_MD.contiguous()
    sorted_ids, block_expert = moe_align(ids_MA, E, BM)
    num_blocks = block_expert.numel()
    h_PF = torch.empty(P, F, dtype=torch.float32, device=x_MD.device)  # f32, as the reference
    BN1 = cfg.BN1
    moe_gate_up_kernel[(num_blocks, cdiv(F, BN1))](
        x_MD, wg_EDF, wu_EDF, sg_EGF if quant else wg_EDF, su_EGF if quant else wu_EDF, h_PF,
        sorted_ids, block_expert, P, D, F, kw1.group_k, kw1.num_groups,
        A=A, WFMT=kw1.wfmt, BM=BM, BN=BN1, BK=bk1, EVEN_K=D % bk1 == 0, EVEN_N=F % BN1 == 0, F32=interpreting(), LATE=late,
        **math, I4PAIR=pair, num_warps=cfg.W1, num_stages=cfg.S1)
    split = cfg.SPLIT
    k_per_split = cdiv(cdiv(F, split), bk2) * bk2
    split = cdiv(F, k_per_split)
    out = (torch.zeros if zeros else torch.empty)(split, P, D, dtype=torch.float32,
                                                   device=x_MD.device)
    gates_P = gates_MA.float().reshape(P).contiguous()  # the kernel rounds it to bf16 (jax)
    BN2 = cfg.BN2
    moe_down_kernel[(num_blocks, cdiv(D, BN2), split)](
        h_PF, wd_EFD, sd_EGD if quant else wd_EFD, gates_P, out, sorted_ids, block_expert,
        P, D, F, kw2.group_k, kw2.num_groups, k_per_split,
        WFMT=kw2.wfmt, BM=BM, BN=BN2, BK=bk2, EVEN_K=k_per_split * split == F and F % bk2 == 0,
        EVEN_N=D % BN2 == 0, F32=interpreting(), LATE=late, SGLANG=math["SGLANG"],
        MAGIC=late and bool(cfg.MAGIC), I4PAIR=pair, num_warps=cfg.W2, num_stages=cfg.S2)
    return out.view(split, M, A, D)


# GEMV path (decode, a pair or two per expert): one program row per (token, slot) pair, each
# streaming its expert's weight; no align, no padding rows. Pairs that share an expert read it
# once each, so it only pays while P is about the number of distinct experts (MoeTiles.GEMV:
# the largest P it serves). GSPLIT1 > 1 splits the gate/up K range too (f32 partials, then one
# combine kernel): at a tensor-parallel shard's width the column tiles alone leave most SMs idle.


def _gemv_k_split(K: int, kw: KernelWeights, want_split: int, want_bk: int, min_bk: int = 1
                  ) -> tuple[int, int, int, int]:
    """(split, k_per_split, chunk, bk) for a GEMV over K rows in kw's scale groups: with G > 1
    whole groups per split, reduced and scaled per group (chunk = group); with one group (or
    bf16) whole BK tiles per split, reduced once (chunk = k_per_split). `min_bk`: the
    smallest K tile the kernel takes (16 for the tensor cores, 32 for int4's byte pairs: a
    narrower wanted tile is raised to it); bk 0 if no tile fits a group."""
    G, group_k = kw.num_groups, kw.group_k
    if G > 1:
        bk = k_tile(group_k, G, max(want_bk, min_bk), at_least=min_bk)
        k_per_split = cdiv(G, max(1, min(want_split, G))) * group_k
        chunk = group_k
    else:
        bk = max(want_bk, min_bk)
        k_per_split = cdiv(cdiv(K, max(1, want_split)), bk) * bk
        chunk = k_per_split
    return cdiv(K, k_per_split), k_per_split, chunk, bk


def _fused_moe_gemv(x_MD, gates_MA, ids_MA, wg_EDF, sg_EGF, wu_EDF, su_EGF, wd_EFD, sd_EGD,
                    cfg: MoeTiles, math: dict, kw1: KernelWeights, kw2: KernelWeights
                    ) -> torch.Tensor:
    """The GEMV path: f32 terms [S, M, A, D]."""
    from grok1.ops.moe_triton import (
        moe_gelu_combine_kernel,
        moe_gemv_down_kernel,
        moe_gemv_gate_up_kernel,
        moe_mma_gemv_down_kernel,
        moe_mma_gemv_gate_up_kernel,
    )
    M, D = x_MD.shape
    A = ids_MA.shape[1]
    F = wg_EDF.shape[2]
    P = M * A
    quant = kw1.wfmt != 0
    dequant = cfg.DEQUANT
    x_MD = x_MD.contiguous()
    ids = ids_MA.reshape(P).contiguous()  # int32 or int64: the kernels load either
    dev = x_MD.device
    # the tensor cores need K tiles of 16 inside a scale group (int4 32: 16 byte rows, each
    # two rows of the matrix); narrower groups take the FMAs
    min_mma = 32 if kw1.wfmt == 2 else 16
    mma = bool(cfg.GMMA) and all(_gemv_k_split(K, kw, 1, min_mma, min_mma)[3]
                                 for K, kw in ((D, kw1), (F, kw2)))
    min_bk = min_mma if mma else 1
    if mma:  # the same launch contract on the tensor cores (MoeTiles.GMMA)
        gate_up, down = moe_mma_gemv_gate_up_kernel, moe_mma_gemv_down_kernel
        kernel_args = dict(F32=interpreting())
    else:
        gate_up, down = moe_gemv_gate_up_kernel, moe_gemv_down_kernel
        kernel_args = dict(DEQUANT=dequant)
    split1, k_per_split1, chunk1, bk1 = _gemv_k_split(D, kw1, cfg.GSPLIT1, cfg.GBK1, min_bk)
    h_PF = torch.empty(P, F, dtype=torch.float32, device=dev)  # f32, as the reference
    parts = h_PF if split1 == 1 else torch.empty(split1, P, 2, F, dtype=torch.float32, device=dev)
    BN1 = cfg.GBN1
    gate_up[(P, cdiv(F, BN1), split1)](
        x_MD, ids, wg_EDF, wu_EDF, sg_EGF if quant else wg_EDF, su_EGF if quant else wu_EDF, parts,
        P, D, F, kw1.group_k, kw1.num_groups, chunk1, k_per_split1, A=A, WFMT=kw1.wfmt,
        SPLIT=split1, BN=BN1, BK=bk1,
        EVEN_K=split1 * k_per_split1 == D and chunk1 % bk1 == 0, EVEN_N=F % BN1 == 0,
        **kernel_args, **math, num_warps=cfg.GW1, num_stages=cfg.GS1)
    if split1 > 1:
        moe_gelu_combine_kernel[(P, cdiv(F, 1024))](parts, h_PF, P, F, SPLIT=split1,
                                                           BN=1024, **math, num_warps=4)
    split, k_per_split, chunk2, bk2 = _gemv_k_split(F, kw2, cfg.GSPLIT, cfg.GBK2, min_bk)
    out = torch.empty(split, P, D, dtype=torch.float32, device=dev)
    gates_P = gates_MA.float().reshape(P).contiguous()  # the kernel rounds it to bf16 (jax)
    BN2 = cfg.GBN2
    down[(P, cdiv(D, BN2), split)](
        h_PF, ids, wd_EFD, sd_EGD if quant else wd_EFD, gates_P, out, P, D, F, kw2.group_k,
        kw2.num_groups, chunk2, k_per_split, WFMT=kw2.wfmt, BN=BN2, BK=bk2,
        EVEN_K=split * k_per_split == F and chunk2 % bk2 == 0, EVEN_N=D % BN2 == 0,
        **kernel_args, SGLANG=math["SGLANG"], num_warps=cfg.GW2, num_stages=cfg.GS2)
    return out.view(split, M, A, D)


def kernel_supported(kw_in: KernelWeights, kw_down: KernelWeights) -> bool:
    """Whether the kernels can tile these scale groups (tiny test widths may not)."""
    return all(k_tile(kw.group_k, kw.num_groups, 128) for kw in (kw_in, kw_down))


class FusedMoE(torch.nn.Module):
    """Drop-in for model.MoE (same parameter names: router, w_gate/w_up/w_down.weight/.scales),
    bf16 or any quantized format (grok1.quant.WeightFormat): f32 router as the reference, then
    the fused kernels; the twin moe_ref where they can't run (`kernel_ok` False: widths the
    kernels can't tile, or not on a GPU)."""

    def __init__(self, moe: torch.nn.Module):
        super().__init__()
        self.top_k = moe.top_k
        self.router_softcap, self.gelu, self.rounding = moe.router_softcap, moe.gelu, moe.rounding
        self.router = moe.router
        self.w_gate, self.w_up, self.w_down = moe.w_gate, moe.w_up, moe.w_down
        self.weights = self.w_gate.weights  # the matrices' format (None: bf16)
        D, F = self.w_down.weight.shape[2], self.w_gate.weight.shape[2]
        self.kernel_ok = kernel_supported(
            kernel_weights(self.weights, self.w_gate.weight, self.w_gate.scales, D, "w_gate"),
            kernel_weights(self.weights, self.w_down.weight, self.w_down.scales, F, "w_down"))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor | PartialSums:
        """The kernels' f32 terms as PartialSums [S, M, A, D] over (K splits, slots), for the
        fused residual norm to sum (grok1.ops.rmsnorm.add_rms_norm); bf16 [M, D] with SGLang's
        rounding (each slot rounded before the slots add: not a plain sum); or bf16 [..., D]
        from the twin."""
        from grok1.ops.router import route_op
        x_MD = x_BTD.reshape(-1, x_BTD.shape[-1])
        _, gates, ids = route_op(x_MD, self.router, self.top_k, self.router_softcap)
        if self.kernel_ok and use_kernel(x_MD):
            terms = fused_moe(x_MD, gates, ids, self.w_gate.weight, self.w_gate.scales,
                              self.w_up.weight, self.w_up.scales, self.w_down.weight,
                              self.w_down.scales, reduce=False, gelu=self.gelu,
                              rounding=self.rounding, weights=self.weights)
            if self.rounding == "sglang":
                return sum_slots_sglang(terms, x_MD.dtype)
            return PartialSums(terms, (0, 2))
        return moe_ref(x_MD, gates, ids, self.w_gate, self.w_up, self.w_down, gelu=self.gelu,
                       rounding=self.rounding).view_as(x_BTD)
