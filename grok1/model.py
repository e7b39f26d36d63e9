"""Grok-1 and Grok-2 forward pass in plain PyTorch: the same function as xai-org/grok-1 model.py
(SPEC section 2) and, switched by config fields, as SGLang's grok.py computes Grok-2
(../shared/grok2/SPEC.md, "grok2 SPEC" below).

Every bf16 rounding point of the reference is kept (SPEC 2.8, 10): projections and QK^T/PV in
bf16, RoPE / attention scores / softmax / norms / router / the expert GeGLU and down-projection in
f32. No parallelism and no custom kernels here: `grok1.engine` and `grok1.parallel` change a model
from outside, and the functions below are the reference twins their kernels are tested against.
The layers below are the only copy of the model's math: plain generation, training and the
serving engine all run them, each through a `ForwardContext` that says where the tokens sit
(a dense batch or a paged cache) and runs each step (twins, or the engine's fused kernels).

Shape letters: B batch, T new tokens, S cached positions, D emb_size, N query heads, K kv heads,
G query heads per kv head, H key_size, E experts, A selected experts, F expert width, V vocab,
M flattened tokens (B*T).

Compute dtype: bf16 (the default) rounds where the reference rounds; `Grok1(...,
compute_dtype=torch.float32)` carries every activation in f32 instead, with no bf16 rounding
anywhere, the weights' bf16 values taken exactly (the golden's float32 check, grok2 golden
README). The functions below round to their inputs' dtype, so the activations' dtype is the
compute dtype throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from grok1.config import GrokConfig
from grok1.moe_dispatch import ExpertGroups, group_by_expert, grouped_mm, per_group
from grok1.quant import INT8, QUANT_GROUPS, WeightFormat, dequantize_as, weight_format
from grok1.sharding import Layout, local_config

BF16 = torch.bfloat16
SOFTCAP = 30.0  # attention logits: 30 * tanh(s / 30), f32, before masking (SPEC 2.5)
MASKED = -1e30  # the reference's fill for masked scores
RMS_EPS = 1e-5
ROPE_BASE = 10000.0
COMPUTE_DTYPES = (BF16, torch.float32)


def bf16_constant(x: float) -> float:
    """The value a Python float takes as a weakly typed bf16 literal under jit (78.38 -> 78.5)."""
    return torch.tensor(x, dtype=BF16, device="cpu").item()  # also under torch.device("meta")


# ---- the reference's building blocks (also the twins of the fused kernels) -------------------

def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype the reference's f32 math is evaluated in on `device` before its rounding point.

    f32 on GPUs, as the reference. f64 on CPUs, then rounded to f32 (and to bf16 where the
    reference rounds): torch's vectorized CPU kernels (AVX2, AVX-512, AVX-512-BF16, AMX) sum
    and approximate tanh/exp/rsqrt in orders of their own, so their f32 results differ in the
    last bit from machine to machine, and a random model amplifies one bit (a near-tie in the
    top-2 routing flips) into 1 % of the golden logits. Taken in f64, each f32 result is the
    correctly rounded one on every machine, and the same whatever the order of the sum.
    """
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


# A product: None (a @ b), an einsum equation, or a function (a, b) -> product of one dtype
# (a grouped matmul over the MoE's experts: moe_ref).
Product = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def _dot(a: torch.Tensor, b: torch.Tensor, product: Product) -> torch.Tensor:
    if product is None:
        return a @ b
    return torch.einsum(product, a, b) if isinstance(product, str) else product(a, b)


def matmul_bf16(a: torch.Tensor, b: torch.Tensor, product: Product = None) -> torch.Tensor:
    """bf16 x bf16 -> bf16 with f32 accumulation and one rounding, as XLA's dot.

    cuBLAS does exactly that. torch's CPU bf16 kernels round partial sums (5 % on the golden
    logits), so on the CPU the product is taken in f64 (`wide_dtype`) and rounded to f32, then
    to bf16: the f32 accumulator's value, correctly rounded, on every machine.
    """
    if a.is_cuda:
        return _dot(a, b, product)
    return _dot(a.double(), b.double(), product).float().to(BF16)


def matmul_wide(a: torch.Tensor, b: torch.Tensor, product: Product = None) -> torch.Tensor:
    """The reference's f32 dots in `wide_dtype` (f64 on the CPU), not yet rounded to f32."""
    wide = wide_dtype(a.device)
    return _dot(a.to(wide), b.to(wide), product)


def matmul_f32(a: torch.Tensor, b: torch.Tensor, product: Product = None) -> torch.Tensor:
    """The reference's f32 dots (router, expert down-projection) -> f32, `wide_dtype` inside."""
    return matmul_wide(a, b, product).float()


def matmul(a: torch.Tensor, b: torch.Tensor, product: Product = None) -> torch.Tensor:
    """a @ b in the compute dtype (the operands'): `matmul_bf16` for bf16, else `matmul_f32`."""
    if a.dtype == BF16:
        return matmul_bf16(a, b, product)
    return matmul_f32(a, b, product)


@dataclasses.dataclass(frozen=True)
class PartialSums:
    """A matmul's output not yet summed and rounded: f32 terms (f64 on the CPU) whose sum over
    `sum_dims` is the value, rounded to bf16 once, as one matmul's accumulator is.

    Kernels return these where the consumer can sum them in its own pass (a split-K GEMV's
    K splits [S, M, N]; the MoE's K splits and slots [S, M, A, D]; a tensor-parallel rank's
    all-reduced sum [1, M, N]): the fused residual norm and the RoPE kernel sum them, saving
    the launches that would sum and round. Anything else takes `value()`.
    """
    terms: torch.Tensor
    sum_dims: tuple[int, ...] = (0,)

    def value(self, dtype: torch.dtype = BF16) -> torch.Tensor:
        """The value in the compute dtype (summed in the terms' dtype, rounded through f32)."""
        return self.terms.sum(dim=self.sum_dims).float().to(dtype)

    def unflatten(self, dim: int, sizes: tuple[int, ...]) -> PartialSums:
        """The same sums with the last dim split (e.g. into heads); `dim` must be -1."""
        if dim != -1 or self.terms.dim() - 1 in self.sum_dims:
            raise ValueError("PartialSums.unflatten splits the last, unsummed dim only")
        return PartialSums(self.terms.unflatten(-1, sizes), self.sum_dims)


def summed(a: torch.Tensor | PartialSums, dtype: torch.dtype = BF16) -> torch.Tensor:
    """The value of a matmul output in the compute dtype `dtype`, whether summed already or not
    (an f64 CPU result rounds through f32, as the reference's f32 accumulator)."""
    if isinstance(a, PartialSums):
        return a.value(dtype)
    return a if a.dtype == dtype else a.float().to(dtype)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """w * x / rms(x) in f32, cast back to x's dtype; scale applied as w, not 1 + w (SPEC 2.4)."""
    wide = wide_dtype(x.device)
    xw = x.to(wide)
    y = scale.to(wide) * (xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + eps))
    return y.float().to(x.dtype)


def rope_cos_sin(positions_BT: torch.Tensor, head_size: int, base: float = ROPE_BASE
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """f32 cos/sin [B, T, H] of the half-split (rotate_half) layout; never precomputed in bf16.
    `base`: the config's rope_theta (Grok-2: plain RoPE, base int(208533496), grok2 SPEC 2.7)."""
    wide = wide_dtype(positions_BT.device)
    exponent = torch.arange(0, head_size, 2, dtype=wide, device=positions_BT.device) / head_size
    inv_freq = (1.0 / base ** exponent).float()
    phase = positions_BT.float()[..., None] * inv_freq  # f32, as the reference
    phase = torch.cat([phase, phase], dim=-1).to(wide)
    return torch.cos(phase).float(), torch.sin(phase).float()


def apply_rope(x_BTNH: torch.Tensor, cos_BTH: torch.Tensor, sin_BTH: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, computed in f32 and rounded once (SPEC 2.5.2)."""
    x = x_BTNH.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    out = x * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]
    return out.to(x_BTNH.dtype)


def softcap_f32(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) in f32 (`wide_dtype` inside); a cap of 0 is none."""
    if not cap:
        return x
    return cap * torch.tanh((x / cap).to(wide_dtype(x.device))).float()


def attention_temperature(positions_BT: torch.Tensor, length: int) -> torch.Tensor:
    """f32 [B, T]: SGLang's score multiplier of a query at position n, log2(n) / log2(L) for
    n > L, else 1 (grok2 SPEC 2.4 step 5; keys do not enter it)."""
    n = positions_BT.to(wide_dtype(positions_BT.device))
    return torch.where(n > length, torch.log2(n.clamp_min(1)) / math.log2(length),
                       torch.ones_like(n)).float()


def attention_ref(q_BTNH: torch.Tensor, k_BSKH: torch.Tensor, v_BSKH: torch.Tensor,
                  mask_BTS: torch.Tensor, multiplier: float, softcap: float = SOFTCAP,
                  temperature_BT: torch.Tensor | None = None, rounding: str = "jax"
                  ) -> torch.Tensor:
    """GQA attention with the c*tanh soft-cap (c = `softcap`, 0 = none), then the query's
    temperature (Grok-2; None = 1); query head n uses kv head n // G. -> [B, T, N*H].
    `rounding` "sglang": SGLang's triton kernels' points (grok2 SPEC 2.4 steps 3 and 6): f32
    scores, exp(s - max) rounded unnormalised for p @ v, divided by the f32 row sum after."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    sglang = rounding == "sglang"
    scores = matmul_f32 if sglang else matmul  # the reference rounds them (bf16)
    s = scores(q_BTKGH, k_BSKH, "btkgh,bskh->bkgts")
    s = s.float() * multiplier
    s = softcap_f32(s, softcap)  # f32 steps
    if temperature_BT is not None:  # after the cap (grok2 SPEC 2.4 step 5)
        s = s * temperature_BT[:, None, None, :, None]
    s = s.masked_fill(~mask_BTS[:, None, None], MASKED)
    if sglang:
        w = s.to(wide_dtype(s.device))
        e = torch.exp(w - w.amax(-1, keepdim=True))
        o = matmul_f32(e.float().to(v_BSKH.dtype), v_BSKH, "bkgts,bskh->bkgth")
        o = (o / e.sum(-1, keepdim=True).float()).to(v_BSKH.dtype).permute(0, 3, 1, 2, 4)
        return o.reshape(B, T, N * H)
    p = torch.softmax(s.to(wide_dtype(s.device)), dim=-1).float().to(v_BSKH.dtype)
    o = matmul(p, v_BSKH, "bkgts,bskh->btkgh")
    return o.reshape(B, T, N * H)


# The attention's kernels (Grok1's `attention`): "plain", attention_ref (the reference's
# rounding points), or "flex", attention_flex (an opt-in for training throughput).
ATTENTION_KERNELS = ("plain", "flex")


def check_attention_kernel(attention: str) -> None:
    """ValueError naming `attention` unless it is one of ATTENTION_KERNELS."""
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention={attention!r}: expected one of "
                         f"{', '.join(ATTENTION_KERNELS)}")


@functools.cache
def _flex_attention(compiled: bool) -> Callable[..., torch.Tensor]:
    """torch's flex_attention, compiled into one fused kernel (forward and backward) on a GPU;
    uncompiled it is torch's reference math (materialising the scores), forward only on a CPU.
    Imported here, not at the top: a CPU install of grok1 never needs it."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_block_mask(mask_BTS: torch.Tensor) -> object:
    """The flex kernel's BlockMask of `mask_BTS` (True: key visible): blocks with no visible key
    are skipped, full ones read no mask; the partial ones (the causal diagonal, pad keys) look
    the mask up. Made once per forward (DenseContext), shared by every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T, S = mask_BTS.shape
    return create_block_mask(lambda b, h, q, k: mask_BTS[b, q, k], B, None, T, S,
                             device=mask_BTS.device)


def attention_flex(q_BTNH: torch.Tensor, k_BSKH: torch.Tensor, v_BSKH: torch.Tensor,
                   block_mask: object, multiplier: float, softcap: float = SOFTCAP,
                   temperature_BT: torch.Tensor | None = None, compiled: bool | None = None
                   ) -> torch.Tensor:
    """attention_ref's function through torch's flex_attention: the same scale, c*tanh cap
    (a score_mod), temperature, mask (a BlockMask, flex_block_mask) and GQA (query head n uses
    kv head n // G: enable_gqa), but its rounding: the scores stay f32 from the dot on (the
    reference rounds them to bf16), an online f32 softmax, bf16 probabilities into p @ v.
    A query with no visible key gets 0 here, attention_ref's uniform average over all keys
    there (a row of pad tokens only). -> [B, T, N*H] in q's dtype. `compiled` (default: on a
    GPU) runs the fused kernel (a GPU's needs H >= 16); uncompiled, torch's reference math.
    Forward only on a CPU (torch has no CPU backward for it)."""
    B, T, N, H = q_BTNH.shape

    def score_mod(s, b, h, q, k):
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        return s if temperature_BT is None else s * temperature_BT[b, q]

    o = _flex_attention(q_BTNH.is_cuda if compiled is None else compiled)(
        q_BTNH.transpose(1, 2), k_BSKH.transpose(1, 2), v_BSKH.transpose(1, 2),
        score_mod=score_mod, block_mask=block_mask, scale=multiplier, enable_gqa=True,
        # the main kernel always: the decoding one, which torch picks for under 128 queries,
        # needs a power-of-2 count of query heads per kv head, and Grok's is 6
        kernel_options={"BACKEND": "TRITON"})
    return o.transpose(1, 2).reshape(B, T, N * H)


def gelu_f32(x: torch.Tensor, kind: str = "tanh") -> torch.Tensor:
    """GELU in f32: "tanh"-approximate (jax.nn.gelu's default; SPEC 2.6) or exact "erf"
    (SGLang's CUDA kernels; grok2 SPEC 2.5)."""
    approximate = "tanh" if kind == "tanh" else "none"
    return F.gelu(x.to(wide_dtype(x.device)), approximate=approximate).float()


def gelu_glu(gate_MF: torch.Tensor, up_MF: torch.Tensor, kind: str = "tanh") -> torch.Tensor:
    """GELU(gate) * up in f32 (`gelu_f32`'s `kind`)."""
    return gelu_f32(gate_MF, kind) * up_MF.float()


def route(x_MD: torch.Tensor, router_DE: torch.Tensor, top_k: int, softcap: float = 0.0
          ) -> tuple[torch.Tensor, ...]:
    """f32 router: (logits [M, E], gates [M, A], expert ids [M, A]); gates are the softmax over
    all experts, not renormalised over the selected ones (SPEC 2.6). `softcap` caps the logits
    first (Grok-2's 30, grok2 SPEC 2.5); the top-k by probability is the top-k by logit."""
    logits = softcap_f32(matmul_f32(x_MD, router_DE), softcap)
    probs = torch.softmax(logits.to(wide_dtype(logits.device)), dim=-1).float()
    gates, ids = probs.topk(top_k, dim=-1)
    return logits, gates, ids


EXPERT_DOWN = ("f32", "bf16")  # the down-projection's numerics (moe_ref)


def expert_matmul(x_PK: torch.Tensor, w: Linear, groups: ExpertGroups,
                  dot: Callable[..., torch.Tensor], backend: str | None = None) -> torch.Tensor:
    """Each expert's group of rows of x (sorted by expert) times that expert's matrix of `w`,
    taken by `dot` (matmul or matmul_wide). Dense matrices go all at once (one grouped matmul,
    grok1.moe_dispatch: no host sync on a GPU). Quantized ones (and `backend` "loop") go
    expert by expert, each dequantized when its turn comes, so that one expert's bf16 matrix
    is in memory at a time (all eight of a Grok-1 matrix take 3.2 GB)."""
    if w.weights is None and backend != "loop":
        product = functools.partial(grouped_mm, groups=groups, backend=backend)
        return dot(x_PK, w.dense().to(x_PK.dtype), product)
    return per_group(x_PK, groups, lambda x, e: dot(x, w.dense(expert=e).to(x.dtype)))


def moe_ref(x_MD: torch.Tensor, gates_MA: torch.Tensor, ids_MA: torch.Tensor,
            w_gate: Linear, w_up: Linear, w_down: Linear, *,
            out_dtype: torch.dtype | None = None, gelu: str = "tanh",
            rounding: str = "jax", down: str = "f32", backend: str | None = None
            ) -> torch.Tensor:
    """Sparse top-k dispatch: the (token, slot) pairs sorted by expert, each expert's rows
    through its matrices (`expert_matmul`: grouped for dense matrices, expert by expert for
    quantized ones), the gated outputs added back per token; equal to the reference's
    all-experts one-hot einsum, and differentiable. The gate/up matmuls are in the compute
    dtype (x's), GELU, product, down-projection and the gated sum f32 (`wide_dtype`: f64 on
    the CPU, where the down-projection also stays unrounded until the sum, so ranks' partial
    sums add up to one process's value). `out_dtype` (default: x's, rounded from f32) keeps the
    sum unrounded for a sum across ranks (`wide_dtype`). `rounding` "sglang" (grok2 SPEC 2.5)
    keeps the gates f32, stores the GELU product and each expert's gated output in x's dtype
    and adds the slots in it. `down` "bf16" (an opt-in numerics for training throughput, not
    the reference's) stores the GELU product in x's dtype and takes the down-projection as a
    matmul in it (rounded once more, per slot, before the f32 gated sum). `backend`: the
    grouped matmul's (grok1.moe_dispatch.BACKENDS), or "loop": expert by expert."""
    if down not in EXPERT_DOWN:
        raise ValueError(f"down={down!r}: expected one of {', '.join(EXPERT_DOWN)}")
    wide = wide_dtype(x_MD.device)
    sglang = rounding == "sglang"
    per_slot = sglang and out_dtype is None  # SGLang's bf16 y_1 + y_2
    out = torch.zeros(x_MD.shape, dtype=x_MD.dtype if per_slot else wide, device=x_MD.device)
    # the reference rounds the gate to bf16 first; SGLang multiplies the f32 probability
    # into the down-projection's f32 accumulator
    gates = gates_MA.to(wide) if sglang else gates_MA.to(BF16).to(wide)
    groups = group_by_expert(ids_MA, w_gate.weight.shape[0])
    rows = groups.rows_P
    # each pair's token, sorted by expert (token order within an expert); index_select, whose
    # backward is an index_add (no host sync on a GPU)
    x = x_MD.index_select(0, rows)
    h = gelu_glu(w_gate.expert_matmul(x, groups, matmul, backend),
                 w_up.expert_matmul(x, groups, matmul, backend), gelu)
    if sglang or down == "bf16":
        h = h.to(x.dtype)  # gelu_and_mul stores its output (grok2 SPEC 2.5, S6)
    if down == "bf16":
        y = w_down.expert_matmul(h, groups, matmul, backend).to(wide)
    else:
        y = w_down.expert_matmul(h, groups, matmul_wide, backend)
    y = y * gates.reshape(-1).index_select(0, groups.order_P)[:, None]
    out.index_add_(0, rows, y.float().to(out.dtype) if per_slot else y)
    if per_slot:
        return out
    return out.to(out_dtype) if out_dtype else out.float().to(x_MD.dtype)


# ---- modules ---------------------------------------------------------------------------------

class Linear(nn.Module):
    """x @ W with W stored [(E,) in, out] as in the reference, no bias.

    W is a bf16 (or f32, for training) parameter, or, with a weight format (`weights`, see
    grok1.quant.WeightFormat; `quant_groups` alone means the release's int8 with that many scale
    groups), a `weight` buffer of the format's storage dtype (int8; uint8 of packed int4 codes;
    float8_e4m3fn) plus bf16 `scales` [(E,) G, out], dequantized on every call (`dense`), so the
    stored weights stay as small in memory as on disk.
    """

    def __init__(self, d_in: int, d_out: int, *, experts: int | None = None,
                 quant_groups: int | None = None, weights: WeightFormat | None = None,
                 dtype: torch.dtype = BF16):
        super().__init__()
        lead = (experts,) if experts else ()
        self.weights = weights or (INT8 if quant_groups else None)  # declared: None is dense
        if self.weights is not None:
            fmt = self.weights
            groups = fmt.num_groups(d_in, quant_groups or 1)
            self.register_buffer("weight", torch.empty(fmt.weight_shape(lead, d_in, d_out),
                                                       dtype=fmt.storage_dtype))
            self.register_buffer("scales", torch.empty(*lead, groups, d_out,
                                                       dtype=fmt.scale_dtype))
        else:
            self.weight = nn.Parameter(torch.empty(*lead, d_in, d_out, dtype=dtype))
            self.scales = None

    @property
    def quantized(self) -> bool:
        """Int8 with bf16 scales as released: what the engine's int8 kernels take."""
        return self.weights == INT8

    def dense(self, expert: int | None = None) -> torch.Tensor:
        """The bf16 matrix [in, out] (of one expert when given)."""
        w = self.weight if expert is None else self.weight[expert]
        if self.weights is None:
            return w.to(BF16)
        return dequantize_as(self.weights, w, self.scales if expert is None
                             else self.scales[expert])

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        return matmul(x, self.dense(expert).to(x.dtype))  # in the compute dtype (x's)

    def expert_matmul(self, x_PK: torch.Tensor, groups: ExpertGroups,
                      dot: Callable[..., torch.Tensor], backend: str | None = None
                      ) -> torch.Tensor:
        """The MoE's products with these stacked experts (module function expert_matmul):
        a method, so that a subclass adds to them (grok1.lora's adapters, per token)."""
        return expert_matmul(x_PK, self, groups, dot, backend)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))  # f32 in the checkpoint
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


@dataclasses.dataclass
class KVCache:
    """Static per-layer K/V buffers, written in place at each row's own positions.

    `lengths_B` counts the valid positions of each row; `real_BS` is False where the key is a
    pad token (the reference masks tokens == pad as keys, SPEC 2.2).
    """
    k_LBSKH: torch.Tensor
    v_LBSKH: torch.Tensor
    real_BS: torch.Tensor
    lengths_B: torch.Tensor

    @classmethod
    def allocate(cls, config: GrokConfig, batch: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = BF16) -> KVCache:
        """Zeroed buffers; `dtype` is the model's compute dtype (Grok1.compute_dtype)."""
        if max_len > config.sequence_len:
            raise ValueError(f"cache length {max_len} exceeds sequence_len={config.sequence_len}")
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.key_size)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def max_len(self) -> int:
        return self.k_LBSKH.shape[2]


class ForwardContext:
    """Where a forward's tokens sit and how its steps run: the one seam between the model's
    math (below) and a caller's cache and kernels, as vLLM's forward context or gpt-fast's
    input_pos. `DenseContext` is the reference's (a [B, T] batch, an optional static KVCache);
    grok1.engine's `PagedContext` is the serving engine's (flattened tokens of many sequences,
    a paged cache, fused kernels whose twins are the functions above).

    Hidden states are [..., D] (the dense context's [B, T, D], the engine's [M, D]); a matmul
    output may be `PartialSums` wherever the step consuming it takes them.

    `bf16_only`: the context's steps compute in bf16 only (the engine's kernels), so
    `Grok1.run_layers` refuses a float32 compute dtype rather than compute something else.
    """
    bf16_only: bool = True

    def project(self, x: torch.Tensor, linears: tuple[nn.Module, ...]
                ) -> list[torch.Tensor | PartialSums]:
        """[lin(x) for lin in linears] (one launch for several, where a kernel can)."""
        return [lin(x) for lin in linears]

    def attention(self, layer: int, q: torch.Tensor | PartialSums, k: torch.Tensor | PartialSums,
                  v: torch.Tensor | PartialSums, multiplier: float) -> torch.Tensor:
        """RoPE on q and k, this layer's cache written, attention: q [..., N, H], k/v
        [..., K, H] (bf16 or PartialSums) -> o [..., N * H] bf16."""
        raise NotImplementedError

    def norm(self, h: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """norm(h): a sublayer's input (or the final norm's output)."""
        return norm(h)

    def residual(self, h: torch.Tensor, a: torch.Tensor | PartialSums, out_norm: RMSNorm
                 ) -> torch.Tensor:
        """The sandwich residual step h + out_norm(a), a bf16 add as the reference's. (The
        engine defers it into the norm that reads h next: one fused pass for both.)"""
        return h + out_norm(summed(a, h.dtype).reshape(h.shape))


class DenseContext(ForwardContext):
    """The reference's positions and mask for a [B, T] batch, with or without a static KVCache
    (`Grok1.forward` builds it). Every step is the plain twin, Grok-2's features included:
    RoPE base, attention cap and temperature from `config`; activations in `dtype`.
    `attention` "flex" (training without a cache) takes attention_flex instead of attention_ref."""
    bf16_only = False

    def __init__(self, positions_BT: torch.Tensor, mask_BTS: torch.Tensor,
                 cache: KVCache | None, config: GrokConfig, dtype: torch.dtype = BF16,
                 attention: str = "plain"):
        check_attention_kernel(attention)
        if attention == "flex" and cache is not None:
            raise ValueError("attention='flex' is for training forwards; a KV cache forward "
                             "takes attention='plain'")
        self.positions_BT, self.mask_BTS, self.cache = positions_BT, mask_BTS, cache
        self.dtype = dtype
        self.block_mask = flex_block_mask(mask_BTS) if attention == "flex" else None
        self.cos_BTH, self.sin_BTH = rope_cos_sin(positions_BT, config.key_size,
                                                  config.rope_theta)
        self.softcap, self.rounding = config.attn_logit_softcap, config.rounding
        self.temperature_BT = (attention_temperature(positions_BT, config.attn_temperature_len)
                               if config.attn_temperature_len else None)

    def attention(self, layer: int, q, k, v, multiplier: float) -> torch.Tensor:
        q, k, v = summed(q, self.dtype), summed(k, self.dtype), summed(v, self.dtype)
        k = apply_rope(k, self.cos_BTH, self.sin_BTH)  # the reference rotates k, then q
        q = apply_rope(q, self.cos_BTH, self.sin_BTH)  # v is not rotated
        cache = self.cache
        if cache is not None:
            B = q.shape[0]
            rows_B1 = torch.arange(B, device=q.device)[:, None]
            cache.k_LBSKH[layer][rows_B1, self.positions_BT] = k
            cache.v_LBSKH[layer][rows_B1, self.positions_BT] = v
            S = self.mask_BTS.shape[-1]  # keys beyond the longest row are never visible
            k, v = cache.k_LBSKH[layer][:, :S], cache.v_LBSKH[layer][:, :S]
        if self.block_mask is not None:
            return attention_flex(q, k, v, self.block_mask, multiplier, self.softcap,
                                  self.temperature_BT)
        return attention_ref(q, k, v, self.mask_BTS, multiplier, self.softcap,
                             self.temperature_BT, self.rounding)


def _quantized_linear(name: str, d_in: int, d_out: int, weights: WeightFormat | None,
                      dtype: torch.dtype, experts: int | None = None) -> Linear:
    """The Linear of one of the seven quantizable matrices (`attn.wq`, ..., `moe.w_down`)."""
    return Linear(d_in, d_out, experts=experts, weights=weights,
                  quant_groups=QUANT_GROUPS[name] if weights else None, dtype=dtype)


class Attention(nn.Module):
    def __init__(self, config: GrokConfig, weights: WeightFormat | None, dtype: torch.dtype):
        super().__init__()
        D, H = config.emb_size, config.key_size
        self.config = config  # a tensor-parallel rank's: its local head counts (grok1.sharding)
        self.wq = _quantized_linear("attn.wq", D, config.num_q_heads * H, weights, dtype)
        self.wk = _quantized_linear("attn.wk", D, config.num_kv_heads * H, weights, dtype)
        self.wv = _quantized_linear("attn.wv", D, config.num_kv_heads * H, weights, dtype)
        self.wo = _quantized_linear("attn.wo", config.num_q_heads * H, D, weights, dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int
                ) -> torch.Tensor | PartialSums:
        c = self.config
        q, k, v = ctx.project(x, (self.wq, self.wk, self.wv))
        o = ctx.attention(layer, q.unflatten(-1, (c.num_q_heads, c.key_size)),
                          k.unflatten(-1, (c.num_kv_heads, c.key_size)),
                          v.unflatten(-1, (c.num_kv_heads, c.key_size)),
                          c.attn_output_multiplier)
        return ctx.project(o, (self.wo,))[0]


def _recomputing_in_backward() -> bool:
    """Whether this eager forward runs inside backward (a graph task is running): activation
    checkpointing's recompute. Under torch.compile False, and never asked (a graph break): a
    compiled layer's recompute is part of its backward graph and runs no Python."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Router and experts (moe_ref). `expert_down`: the down-projection's numerics, "f32" (the
    reference's) or "bf16" (opt-in, for training throughput; moe_ref)."""

    def __init__(self, config: GrokConfig, weights: WeightFormat | None, dtype: torch.dtype,
                 expert_down: str = "f32"):
        super().__init__()
        if expert_down not in EXPERT_DOWN:
            raise ValueError(f"expert_down={expert_down!r}: expected one of "
                             f"{', '.join(EXPERT_DOWN)}")
        self.expert_down = expert_down
        D, E, Fw = config.emb_size, config.num_experts, config.ffn_size
        self.top_k = config.num_selected_experts
        self.router_softcap, self.gelu = config.router_logit_softcap, config.gelu
        self.rounding = config.rounding
        self.router = nn.Parameter(torch.empty(D, E, dtype=torch.float32))  # f32 (SPEC 2.6)
        self.w_gate = _quantized_linear("moe.w_gate", D, Fw, weights, dtype, experts=E)
        self.w_up = _quantized_linear("moe.w_up", D, Fw, weights, dtype, experts=E)
        self.w_down = _quantized_linear("moe.w_down", Fw, D, weights, dtype, experts=E)
        # Set while training: the router's logits and choices of the last call, for the
        # load-balancing and z losses (the reference's inference path has none).
        self.last_router_logits: torch.Tensor | None = None
        self.last_expert_ids: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor | PartialSums:
        """[..., D] bf16; kernel-backed replacements (grok1.ops, grok1.parallel) may return
        PartialSums of the flattened rows instead."""
        x = x_BTD.reshape(-1, x_BTD.shape[-1])
        logits, gates, ids = route(x, self.router, self.top_k, self.router_softcap)
        # Not again while activation checkpointing recomputes this layer inside backward: the
        # recomputed logits would keep the recomputed graph up to the router (the layer's
        # attention: f32 scores and probabilities, dequantized matrices) alive until the next
        # forward, in every layer backward has passed through.
        if self.training and not _recomputing_in_backward():
            self.last_router_logits, self.last_expert_ids = logits, ids
        return moe_ref(x, gates, ids, self.w_gate, self.w_up, self.w_down, gelu=self.gelu,
                       rounding=self.rounding, down=self.expert_down).view_as(x_BTD)


class DenseMLP(nn.Module):
    """Grok-2's dense MLP beside the MoE (grok2 SPEC 2.5): w_down(gelu(w_gate x) * w_up x), the
    GELU rounded to the compute dtype before the product, as SGLang's gelu_and_mul kernel."""

    def __init__(self, config: GrokConfig, dtype: torch.dtype):
        super().__init__()
        D, W = config.emb_size, config.dense_width
        self.gelu = config.gelu
        self.w_gate = Linear(D, W, dtype=dtype)
        self.w_up = Linear(D, W, dtype=dtype)
        self.w_down = Linear(W, D, dtype=dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | PartialSums:
        gate, up = (summed(a, x.dtype) for a in ctx.project(x, (self.w_gate, self.w_up)))
        act = gelu_f32(gate, self.gelu).to(x.dtype) * up
        return ctx.project(act, (self.w_down,))[0]


class DecoderLayer(nn.Module):
    """Sandwich norms: a norm before and after attention, and before and after the FFN (the
    MoE, or with a dense_width Grok-2's residual MoE: the dense MLP and the MoE averaged)."""

    def __init__(self, config: GrokConfig, weights: WeightFormat | None, dtype: torch.dtype,
                 expert_down: str = "f32"):
        super().__init__()
        D, eps = config.emb_size, config.rms_norm_eps
        self.attn_norm, self.attn_out_norm = RMSNorm(D, eps), RMSNorm(D, eps)
        self.moe_norm, self.moe_out_norm = RMSNorm(D, eps), RMSNorm(D, eps)
        self.attn = Attention(config, weights, dtype)
        self.moe = MoE(config, weights, dtype, expert_down)
        self.mlp = DenseMLP(config, dtype) if config.residual_moe else None

    def forward(self, h: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        x = ctx.norm(h, self.attn_norm)
        h = ctx.residual(h, self.attn(x, ctx, layer), self.attn_out_norm)
        x = ctx.norm(h, self.moe_norm)
        ffn = self.moe(x)
        if self.mlp is not None:  # (MLP + MoE) / sqrt(2), adds in the compute dtype (SPEC 2.5)
            mlp = summed(self.mlp(x, ctx), x.dtype).reshape(x.shape)
            ffn = (mlp + summed(ffn, x.dtype).reshape(x.shape)) / math.sqrt(2)
        return ctx.residual(h, ffn, self.moe_out_norm)


class TiedUnembedding(nn.Module):
    """logits = round(h @ table^T) * the output multiplier, in the compute dtype (h's); no
    parameter of its own: the table [V, D] is the input embedding (SPEC 2.7), or an untied
    head's transposed weight (Grok-2's lm_head)."""

    def forward(self, h_BTD: torch.Tensor, embed_VD: torch.Tensor, multiplier: float
                ) -> torch.Tensor:
        return matmul(h_BTD, embed_VD.to(h_BTD.dtype).T) * multiplier


class Grok1(nn.Module):
    """The Grok-1 language model (and Grok-2, by its config). `weights` is the format of the
    attention and expert matrices: "int8" (int8 with bf16 scales, the release's; also
    `quantized=True`), "int4", "fp8" (or a grok1.quant.WeightFormat, e.g. int4(64)), or None
    for dense matrices of `dtype`, which is also the dtype of the embedding; every matmul takes
    their bf16 values. `compute_dtype` is that of the activations: bf16 (the references'
    rounding points) or float32 (no bf16 rounding; module docstring). `layout` is None for a
    whole model, or the tensor-parallel slice this process holds (set by
    grok1.parallel.shard_model_, which cuts the tensors). `expert_down` is the experts'
    down-projection numerics: "f32" (the reference's) or "bf16" (opt-in, for training; MoE).
    `attention` is the kernel of forwards without a KV cache: "plain" (attention_ref, the
    reference's rounding) or "flex" (attention_flex: opt-in, for training throughput)."""

    def __init__(self, config: GrokConfig, *, quantized: bool = False,
                 weights: str | WeightFormat | None = None, dtype: torch.dtype = BF16,
                 compute_dtype: torch.dtype = BF16, expert_down: str = "f32",
                 attention: str = "plain"):
        super().__init__()
        check_attention_kernel(attention)
        self.attention = attention
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype}: expected torch.bfloat16 or "
                             "torch.float32")
        fmt = weight_format(weights)
        if quantized and fmt not in (None, INT8):
            raise ValueError(f"quantized=True means int8 weights, but weights={fmt.label()}")
        fmt = INT8 if quantized else fmt
        self.config = config
        self.compute_dtype = compute_dtype
        self.layout: Layout | None = None
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.emb_size, dtype=dtype))
        self.layers = nn.ModuleList(DecoderLayer(config, fmt, dtype, expert_down)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.emb_size, config.rms_norm_eps)
        # Grok-2's untied head [D, V] (grok2 SPEC 2.6); None: the input table is the output's
        self.lm_head = (None if config.tied_embeddings else
                        Linear(config.emb_size, config.vocab_size, dtype=dtype))
        # the output projection (grok1.parallel puts a sharded one in its place)
        self.unembedding: nn.Module = TiedUnembedding()
        # The reference's multipliers are weakly typed bf16 literals (78.5, 0.578125; SPEC
        # 2.1, 2.7); SGLang multiplies by the Python float (grok2 SPEC 2.1) and folds the
        # output multiplier into lm_head (exact for Grok-2's 0.5, a power of two; SPEC 2.6).
        constant = bf16_constant if config.rounding == "jax" else float
        self.embedding_multiplier = constant(config.embedding_multiplier_scale)
        self.output_multiplier = constant(config.output_multiplier_scale)

    @property
    def local_config(self) -> GrokConfig:
        """The config this process's attention and KV cache see (a rank's local head counts)."""
        return self.config if self.layout is None else local_config(self.config, self.layout)

    def forward(self, tokens_BT: torch.Tensor, cache: KVCache | None = None, *,
                lengths_B: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (bf16 values as the reference's; f32 in float32 compute or after a
        final soft cap), or [B, 1, V] with `last_only`.

        With a cache, row b's tokens go to positions cache.lengths_B[b] + t, and the row then
        advances by lengths_B[b] (its real tokens; the rest is right padding), default T.
        `last_only` unembeds only each row's last real token.
        """
        B, T = tokens_BT.shape
        device = tokens_BT.device
        if self.config.mask_pad_keys:
            real_BT = tokens_BT != self.config.pad_token
        else:  # every key is visible to the queries after it (SGLang, grok2 SPEC 2.4 step 6)
            real_BT = torch.ones_like(tokens_BT, dtype=torch.bool)
        if cache is not None and cache.k_LBSKH.dtype != self.compute_dtype:
            raise ValueError(f"KV cache of {cache.k_LBSKH.dtype} for a model computing in "
                             f"{self.compute_dtype}: allocate it with dtype=model.compute_dtype")
        t_T = torch.arange(T, device=device)
        if lengths_B is None:
            lengths_B = torch.full((B,), T, dtype=torch.long, device=device)
        if cache is None:
            positions_BT = t_T.expand(B, T)
            mask_BTS = real_BT[:, None, :] & (t_T[None, :, None] >= t_T[None, None, :])
        else:
            start_B = cache.lengths_B
            positions_BT = start_B[:, None] + t_T
            last = int(positions_BT.max())  # one host sync for the check and the key count
            if last >= cache.max_len:
                raise ValueError(f"KV cache of {cache.max_len} positions is full "
                                 f"(a row would reach position {last})")
            rows_B1 = torch.arange(B, device=device)[:, None]
            cache.real_BS[rows_B1, positions_BT] = real_BT
            S = last + 1
            s_S = torch.arange(S, device=device)
            # query t of row b sits at position p = start_b + t and sees the keys 0..p that are
            # not padding; keys past p belong to later tokens (or are stale) and stay hidden.
            mask_BTS = (s_S[None, None, :] <= positions_BT[:, :, None]) & cache.real_BS[:, None, :S]

        ctx = DenseContext(positions_BT, mask_BTS, cache, self.config, self.compute_dtype,
                           self.attention if cache is None else "plain")
        x = self.run_layers(self.embed_tokens(tokens_BT), ctx)
        if cache is not None:
            cache.lengths_B += lengths_B
        if last_only:
            x = x[torch.arange(B, device=device), lengths_B - 1][:, None]
        return self.unembed(x)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embedding in the compute dtype, times the multiplier (SPEC 2.1)."""
        return self.embed[tokens].to(self.compute_dtype) * self.embedding_multiplier

    def run_layers(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The decoder stack on embedded tokens h [..., D] -> the final norm's output.
        Raises NotImplementedError when `ctx` computes in bf16 only and this model computes in
        float32 (ForwardContext.bf16_only)."""
        if ctx.bf16_only and self.compute_dtype != BF16:
            raise NotImplementedError(
                f"{type(ctx).__name__} computes in bf16 only (its kernels), and this model sets "
                f"compute_dtype={self.compute_dtype}; run it through Grok1.forward")
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx, i)
        return ctx.norm(h, self.norm)

    def unembed(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """The output projection in the compute dtype (the tied table, or Grok-2's lm_head)
        times the output multiplier (SPEC 2.7); with a final_logit_softcap, the f32 logits
        capped after the multiplier, as SGLang (grok2 SPEC 2.6)."""
        table_VD = self.embed if self.lm_head is None else self.lm_head.dense().T
        logits = self.unembedding(h_BTD, table_VD, self.output_multiplier)
        if self.config.final_logit_softcap:
            logits = softcap_f32(logits.float(), self.config.final_logit_softcap)
        return logits

    @property
    def quantized(self) -> bool:
        """Int8 matrices as released (what the engine's kernels take)."""
        return self.layers[0].attn.wq.quantized

    @property
    def weights(self) -> WeightFormat | None:
        """The format of the attention and expert matrices; None: dense."""
        return self.layers[0].attn.wq.weights

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random weights for training from scratch: normal(std) matrices, scaled-down outputs,
        unit norms. Quantized models are made by quantizing trained weights, not initialised."""
        if self.weights is not None:
            raise ValueError("init_weights works on a dense model; quantize trained weights instead")
        out_std = std / math.sqrt(2 * self.config.num_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("scale"):
                    p.fill_(1.0)
                elif name.endswith(("wo.weight", "w_down.weight")):
                    p.copy_(torch.randn(p.shape, generator=generator) * out_std)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
