"""Lazy Triton import and the dispatch rule shared by the ops (no import-time side effects)."""

from __future__ import annotations

import functools
import os

import torch

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
