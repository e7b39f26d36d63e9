"""Int8 weights with bf16 scales, as in the release checkpoint (SPEC section 3).

A quantized matrix W [..., K, N] (K the input dim) is stored as int8 `weight` [..., K, N] and bf16
`scales` [..., G, N]: one scale per output column for each of G equal blocks of the input dim.
G is 8 where the reference shards the input dim 8 ways (attention output, expert down
projection), else 1. Dequantization rounds to bf16 once: W = bf16(weight * scale).

Beside the release's int8, `WeightFormat` describes int4 (W4A16: 4-bit codes packed two per
byte, a bf16 scale per output column and group of 128 inputs) and fp8 (e4m3, a bf16 scale per
output column), both made from the int8 release's bf16 dequantization (`quantize_as`) and read
back by `dequantize_as`, the twin any kernel for them is tested against.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

# Scale groups along the input dim of each quantized matrix, by model.py's module name (SPEC 3).
QUANT_GROUPS: dict[str, int] = {
    "attn.wq": 1, "attn.wk": 1, "attn.wv": 1, "attn.wo": 8,
    "moe.w_gate": 1, "moe.w_up": 1, "moe.w_down": 8,
}


def dequantize(weight_KN: torch.Tensor, scales_GN: torch.Tensor) -> torch.Tensor:
    """bf16 [..., K, N] from int8 [..., K, N] and bf16 scales [..., G, N] (G divides K).

    int8 -> bf16 is exact (|w| <= 127), and a bf16 x bf16 product is computed exactly and
    rounded once, which is the reference's bf16(w * s).
    """
    *lead, K, N = weight_KN.shape
    G = scales_GN.shape[-2]
    w = weight_KN.reshape(*lead, G, K // G, N).to(torch.bfloat16)
    return (w * scales_GN.unsqueeze(-2)).reshape(*lead, K, N)


def quantize(w_KN: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 with bf16 scales per output column and input-dim group.

    Returns (int8 [..., K, N], bf16 [..., G, N]); used to write checkpoints and to build
    random benchmark weights, never on the inference path.
    """
    *lead, K, N = w_KN.shape
    if K % groups:
        raise ValueError(f"input dim {K} is not divisible into {groups} scale groups")
    w = w_KN.float().reshape(*lead, groups, K // groups, N)
    scales = (w.abs().amax(dim=-2) / 127.0).clamp_min(1e-12).to(torch.bfloat16)
    q = torch.round(w / scales.float().unsqueeze(-2)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(*lead, K, N), scales


# ---- other weight formats: int4 (W4A16) and fp8 (e4m3), both requantized from a bf16 reference --

@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a quantized matrix W [(E,) K, N] is stored: `weight` of `storage_dtype` and
    `scales` of `scale_dtype` [(E,) G, N], one scale per output column and input-dim group.

    `group_size` is the number of inputs sharing a scale (int4: 128 by default; the last
    group is shorter when it does not divide K); None for int8, whose G is the release's (1, or
    8 where the reference shards the input dim: QUANT_GROUPS), and for fp8 (G = 1, a scale per
    output channel). Every format dequantizes to bf16 with one rounding, as the release's
    bf16(w * s): each product of a stored value and its bf16 scale is exact in f32.
    """
    name: str
    bits: int
    group_size: int | None
    scale_dtype: torch.dtype
    storage_dtype: torch.dtype

    def num_groups(self, d_in: int, int8_groups: int) -> int:
        """G for a matrix with input dim `d_in` (`int8_groups`: the release's G for it)."""
        if self.name == "int8":
            return int8_groups
        if self.name == "int4":
            return -(-d_in // self.group_size)
        return 1

    def weight_shape(self, lead: tuple[int, ...], d_in: int, d_out: int) -> tuple[int, ...]:
        """The stored weight's shape: int4 packs two input rows per byte."""
        if self.name == "int4":
            if d_in % 2:
                raise ValueError(f"int4 packs input rows in pairs; input dim {d_in} is odd")
            return (*lead, d_in // 2, d_out)
        return (*lead, d_in, d_out)

    def label(self) -> str:
        """`int8`, `fp8`, `int4-g128`: a name that says the group size where there is one."""
        return f"{self.name}-g{self.group_size}" if self.group_size else self.name


INT8 = WeightFormat("int8", 8, None, torch.bfloat16, torch.int8)
FP8 = WeightFormat("fp8", 8, None, torch.bfloat16, torch.float8_e4m3fn)
INT4_GROUP_SIZE = 128
INT4_MAX = 7  # symmetric: codes -7..7, so a group's largest magnitude maps to +-7 either way
FP8_MAX = 448.0  # largest finite e4m3fn
# Clipping ratios tried per int4 group: scale = ratio * absmax / 7, keeping the ratio of least
# squared error against the reference. 1.0 (plain absmax) comes first and only a strictly
# smaller error replaces it, so the search is never worse than absmax.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 ... 0.7
_BLOCK_ELEMENTS = 1 << 24  # weights quantized at once: bounds the search's f32 buffers


def int4(group_size: int = INT4_GROUP_SIZE) -> WeightFormat:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group size must be even and >= 2, not {group_size}")
    return WeightFormat("int4", 4, group_size, torch.bfloat16, torch.uint8)


def weight_format(weights: str | WeightFormat | None,
                  group_size: int = INT4_GROUP_SIZE) -> WeightFormat | None:
    """The format named `weights` ("int8", "int4", "fp8"; None: dense bf16 matrices)."""
    if weights is None or isinstance(weights, WeightFormat):
        return weights
    formats = {"int8": INT8, "fp8": FP8}
    if weights == "int4":
        return int4(group_size)
    if weights not in formats:
        raise ValueError(f"weights={weights!r}: expected one of int8, int4, fp8")
    return formats[weights]


def pack_int4(q_KN: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2, N] from codes in [-8, 7] [..., K, N], two input rows per byte.

    Nibble order: byte [k, n] holds row 2k in its low nibble and row 2k + 1 in its high
    nibble, each as code + 8 (offset binary, 0..15), as GPTQ's and Marlin's symmetric int4.
    Packing along the input dim keeps output columns contiguous, like the int8 layout.
    """
    u = (q_KN.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2, :] | (u[..., 1::2, :] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., K, N] in [-8, 7] from pack_int4's uint8 [..., K/2, N]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-2).flatten(-3, -2)


def _expand_groups(scales_GN: torch.Tensor, group_size: int, K: int) -> torch.Tensor:
    """Scales [..., G, N] repeated over their group's rows -> [..., K, N]."""
    return scales_GN.repeat_interleave(group_size, dim=-2)[..., :K, :]


def dequantize_int4(packed: torch.Tensor, scales_GN: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """bf16 [..., K, N] = bf16(code * scale) (a 4-bit code times a bf16 scale is exact in f32)."""
    q = unpack_int4(packed).to(torch.bfloat16)
    return q * _expand_groups(scales_GN, group_size, q.shape[-2])


def dequantize_fp8(weight_KN: torch.Tensor, scales_1N: torch.Tensor) -> torch.Tensor:
    """bf16 [..., K, N] = bf16(w * scale), per output channel (e4m3 is exact in bf16)."""
    return weight_KN.to(torch.bfloat16) * scales_1N


def dequantize_as(fmt: WeightFormat, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The bf16 matrix [..., K, N] that `weight` and `scales` of format `fmt` stand for."""
    if fmt.name == "int4":
        return dequantize_int4(weight, scales, fmt.group_size)
    if fmt.name == "fp8":
        return dequantize_fp8(weight, scales)
    return dequantize(weight, scales)


def _int4_search(w_GNg: torch.Tensor, ratios: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Codes [G, N, g] and bf16 scales [G, N, 1] of least squared error over `ratios`, for
    groups laid out along the last dim (contiguous: the broadcast of one scale per group runs
    ~10x faster than along a middle dim); two reused buffers, no per-ratio allocations."""
    absmax = w_GNg.abs().amax(dim=-1, keepdim=True)
    work = torch.empty_like(w_GNg)
    rounded = torch.empty(w_GNg.shape, dtype=torch.bfloat16)
    best_s = best_err = None
    for ratio in ratios:
        s = (absmax * (ratio / INT4_MAX)).clamp_min(1e-12).to(torch.bfloat16)
        torch.div(w_GNg, s.float(), out=work)
        work.round_().clamp_(-INT4_MAX, INT4_MAX).mul_(s.float())
        rounded.copy_(work)  # the dequantized value, bf16(code * scale)
        err = work.copy_(rounded).sub_(w_GNg).square_().sum(dim=-1, keepdim=True)
        if best_err is None:
            best_s, best_err = s, err
            continue
        better = err < best_err  # strictly: ties keep the larger ratio (absmax first)
        best_s = torch.where(better, s, best_s)
        best_err = torch.minimum(err, best_err)
    codes = torch.div(w_GNg, best_s.float(), out=work).round_().clamp_(-INT4_MAX, INT4_MAX)
    return codes.to(torch.int8), best_s


def quantize_int4(w_KN: torch.Tensor, group_size: int = INT4_GROUP_SIZE,
                  ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 of a [..., K, N] matrix (the bf16 reference): per output column, groups of
    `group_size` inputs, round to nearest with each group's scale chosen from `ratios` for least
    squared error of the bf16 dequantization. -> (uint8 packed [..., K/2, N], bf16 [..., G, N]).
    Works on blocks of columns (about 64 MB of f32 at a time), so memory stays bounded."""
    *lead, K, N = w_KN.shape
    G = -(-K // group_size)
    flat = w_KN.reshape(-1, K, N)
    L = flat.shape[0]
    packed = torch.empty(L, K // 2, N, dtype=torch.uint8)
    scales = torch.empty(L, G, N, dtype=torch.bfloat16)
    block = max(1, _BLOCK_ELEMENTS // (L * G * group_size))
    for n in range(0, N, block):
        cols = slice(n, n + block)
        w = F.pad(flat[:, :, cols].float(), (0, 0, 0, G * group_size - K))  # zero rows
        w_LGng = w.view(L, G, group_size, -1).transpose(2, 3).contiguous()
        codes, s = _int4_search(w_LGng.view(L * G, -1, group_size), ratios)
        codes_LKn = codes.view(w_LGng.shape).transpose(2, 3).reshape(L, G * group_size, -1)
        packed[:, :, cols] = pack_int4(codes_LKn[:, :K])
        scales[:, :, cols] = s.view(L, G, -1)
    return packed.view(*lead, K // 2, N), scales.view(*lead, G, N)


def quantize_fp8(w_KN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with a bf16 scale per output column (absmax / 448, round to nearest even).
    -> (float8_e4m3fn [..., K, N], bf16 [..., 1, N])."""
    w = w_KN.float()
    scales = (w.abs().amax(dim=-2, keepdim=True) / FP8_MAX).clamp_min(1e-12).to(torch.bfloat16)
    # a scale rounded down to bf16 can put absmax / scale just past 448: saturate, never inf
    q = (w / scales.float()).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales


def quantize_as(fmt: WeightFormat, w_KN: torch.Tensor,
                int8_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, scales) of format `fmt` for the bf16 reference matrix w [..., K, N]."""
    if fmt.name == "int4":
        return quantize_int4(w_KN, fmt.group_size)
    if fmt.name == "fp8":
        return quantize_fp8(w_KN)
    return quantize(w_KN, int8_groups)
