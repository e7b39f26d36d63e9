"""Shared fixtures: the golden model in ../shared, tiny configs, the gpu marker."""

import os
from pathlib import Path

import pytest
import torch

from grok1.config import GrokConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "grok1"
GOLDEN = SHARED / "golden"
TOKENIZER = SHARED / "tokenizer.model"

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with -m gpu on the device)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_rounds_bf16_to_nearest()


def _interpreter_rounds_bf16_to_nearest() -> None:
    """Triton's CPU interpreter (3.6) truncates f32 -> bf16 casts (its cast_impl passes no
    rounding mode), where the GPU rounds to nearest even; the kernels' bf16 rounding points
    (the reference's bf16(w * s), bf16 scores, bf16(p)) then depart by up to an ulp and their
    tests fail on the CPU only. Round as the GPU does, through torch."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits.reshape(src.data.shape), dst_type.scalar)
        return truncating(self, src, dst_type)

    builder.cast_impl = cast_impl


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.exists():
        pytest.skip(f"golden data not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def golden2_dir() -> Path:
    """../shared/grok2/golden (tests/grok2_reference.GOLDEN2), or a skip where it is absent."""
    from grok2_reference import GOLDEN2

    if not GOLDEN2.exists():
        pytest.skip(f"Grok-2 golden data not found at {GOLDEN2}")
    return GOLDEN2


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    if not TOKENIZER.exists():
        pytest.skip(f"tokenizer not found at {TOKENIZER}")
    return TOKENIZER


@pytest.fixture
def tiny_config() -> GrokConfig:
    return GrokConfig.preset("tiny")


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same state-dict keys, and every tensor of the same dtype and values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
