"""Shared fixtures: the golden model in ../shared, tiny configs, the gpu marker."""

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


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.exists():
        pytest.skip(f"golden data not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    if not TOKENIZER.exists():
        pytest.skip(f"tokenizer not found at {TOKENIZER}")
    return TOKENIZER


@pytest.fixture
def tiny_config() -> GrokConfig:
    return GrokConfig.preset("tiny")


def random_model(config: GrokConfig, *, quantized: bool = True, seed: int = 0):
    """A Grok1 with seeded random weights of realistic scale (int8 + bf16 scales if quantized)."""
    from grok1.model import Grok1

    gen = torch.Generator().manual_seed(seed)
    model = Grok1(config, quantized=quantized)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype == torch.int8:
                t.copy_(torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8))
            elif name.endswith("scales"):
                fan_in = model.get_submodule(name.rsplit(".", 1)[0]).weight.shape[-2]
                t.copy_((torch.rand(t.shape, generator=gen) + 0.5) / (127 * fan_in ** 0.5))
            elif name.endswith("scale"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
            else:
                dense_matrix = t.dim() > 1 and name != "embed"
                scale = 1 / t.shape[-2] ** 0.5 if dense_matrix else 0.5
                t.copy_(torch.randn(t.shape, generator=gen) * scale)
    return model.eval()
