"""Lazy Triton import and the dispatch rule shared by the ops (no import-time side effects)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_kernel(t: torch.Tensor) -> bool:
    """Run the Triton kernel for tensors on a CUDA device (or anywhere under the interpreter)."""
    if not triton_available():
        return False
    return t.is_cuda or interpreting()


def device_name(t: torch.Tensor) -> str:
    if t.is_cuda:
        return torch.cuda.get_device_name(t.device).replace(" ", "_")
    return "cpu"


@functools.cache
def load_tuned(op: str, device: str) -> dict:
    """Tuned launch configs for one op and device: {key: {M: config}} from configs/<op>.json."""
    path = CONFIG_DIR / f"{op}.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get(device, {})


def nearest_m(table: dict, m: int) -> dict | None:
    """The entry whose M key is nearest to m (vLLM's rule), or None for an empty table."""
    if not table:
        return None
    key = min(table, key=lambda k: abs(int(k) - m))
    return table[key]
