"""Lazy Triton import and the dispatch rule shared by the ops (no import-time side effects)."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from grok1.quant import FP8, INT8, WeightFormat

NUM_SMS_GUESS = 132  # H100's SM count: sizes grids (K splits, programs) where nothing says


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids and splits."""
    return -(-a // b)


def next_pow2(n: int, at_least: int = 1) -> int:
    """The smallest power of two >= n (and >= at_least): Triton's block sizes."""
    return max(at_least, 1 << (n - 1).bit_length())


def k_tile(group_k: int, num_groups: int, want: int, at_least: int = 16) -> int:
    """The largest K tile want / 2^i >= at_least inside one scale group (dividing group_k; any
    with one group), so one scale row serves a tile; 0 if none. 16 is tl.dot's minimum; the
    GEMVs, which do not use tl.dot, go down to 1."""
    tile = want
    while tile >= at_least:
        if num_groups == 1 or group_k % tile == 0:
            return tile
        tile //= 2
    return 0


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_kernel(t: torch.Tensor) -> bool:
    """Run the Triton kernel for tensors on a CUDA device (or anywhere under the interpreter)."""
    if not triton_available():
        return False
    return t.is_cuda or interpreting()


def device_name(t: torch.Tensor) -> str:
    """The key of t's device in the tuning tables (ops/tile_config.py): the GPU's name, plus its
    architecture as a fallback ("NVIDIA_H200|sm_90"), so an H200 uses configs tuned on an H100."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return f"{torch.cuda.get_device_name(t.device).replace(' ', '_')}|sm_{major}{minor}"
    return "cpu"


# ---- weight formats: the kernels' WFMT constexpr (one kernel family, a loader per format) ----

WFMT = {None: 0, "int8": 1, "int4": 2, "fp8": 3}  # dot_triton's codes, by WeightFormat.name


@dataclasses.dataclass(frozen=True)
class KernelWeights:
    """How a kernel reads a matrix [(E,) K, N]: `wfmt` (dot_triton's WFMT), `group_k` input rows
    per scale (K with one group; int4's last group may be shorter), `num_groups`, and `dtype`,
    the label of the tuned tables' keys ("bf16", "int8", "int4", "fp8")."""
    wfmt: int
    group_k: int
    num_groups: int
    dtype: str


def loadable(weight: torch.Tensor) -> torch.Tensor:
    """A weight as the kernels load it: fp8 as its bytes (uint8, bitcast back in dot_triton), so
    masked loads fill 0 bytes (+0.0) through an integer `other`, which Triton cannot cast to
    fp8; the other formats as they are."""
    return weight.view(torch.uint8) if weight.dtype == torch.float8_e4m3fn else weight


def weight_format_of(weight: torch.Tensor, scales: torch.Tensor | None,
                     fmt: WeightFormat | None, where: str) -> WeightFormat | None:
    """`fmt`, or the format the storage dtype implies (bf16 without scales, int8, fp8); packed
    int4 (uint8) must be named, for its group size."""
    if fmt is not None or scales is None:
        return fmt
    by_dtype = {torch.int8: INT8, torch.float8_e4m3fn: FP8}
    if weight.dtype not in by_dtype:
        raise ValueError(f"{where}: weights of dtype {weight.dtype} need their format named "
                         f"(weights=int4(group_size) for packed int4)")
    return by_dtype[weight.dtype]


def kernel_weights(fmt: WeightFormat | None, weight: torch.Tensor, scales: torch.Tensor | None,
                   K: int, where: str) -> KernelWeights:
    """The kernels' view of a [(E,) K, N] matrix stored in format `fmt` (None: dense bf16);
    ValueError naming `where` and the tensor if its storage does not match the format."""
    if fmt is None:  # (weight_format_of names the format of any weight with scales)
        return KernelWeights(0, K, 1, "bf16")
    rows = fmt.weight_shape((), K, 1)[0]
    if weight.dtype != fmt.storage_dtype or weight.shape[-2] != rows or scales is None:
        raise ValueError(f"{where}: {fmt.label()} weights for input dim {K} are "
                         f"{fmt.storage_dtype} with {rows} rows and bf16 scales, found "
                         f"{weight.dtype} {tuple(weight.shape)}, scales "
                         f"{None if scales is None else tuple(scales.shape)}")
    G = scales.shape[-2]
    group_k = fmt.group_size if fmt.name == "int4" else K // G
    if fmt.num_groups(K, G) != G or (fmt.name != "int4" and K % G):
        raise ValueError(f"{where}: {fmt.label()} scales have {G} groups, which input dim {K} "
                         f"does not fit")
    return KernelWeights(WFMT[fmt.name], group_k, G, fmt.name)
