"""Random full-width Grok-1 weights built directly on the GPU, for benchmarks (like vLLM's
dummy weights): int8 attention and expert matrices with bf16 scales, the rest bf16/f32, in the
release's layout, so no checkpoint is needed. Values are random but sized like trained ones
(unit-variance activations), so routing spreads over the experts and nothing overflows.
"""

from __future__ import annotations

import math

import torch

from grok1.config import GrokConfig
from grok1.model import Grok1


@torch.no_grad()
def dummy_model(num_layers: int = 4, *, device: str | torch.device = "cuda",
                config: GrokConfig | None = None, seed: int = 0,
                quantized: bool = True) -> Grok1:
    """A Grok1 of `num_layers` layers at full width (grok-1 preset unless `config`)."""
    config = (config or GrokConfig.preset("grok-1")).replace(num_layers=num_layers)
    with torch.device(device):
        model = Grok1(config, quantized=quantized)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype == torch.int8:
            t.random_(-127, 128, generator=gen)
        elif name.endswith(".scales"):
            fan_in = _fan_in(model, name)
            # uniform int8 has std ~73; aim at weights of std 1/sqrt(fan_in)
            t.uniform_(0.5, 1.5, generator=gen).mul_(1.0 / (73.3 * math.sqrt(fan_in)))
        elif name.endswith("norm.scale") or name == "norm.scale":
            t.uniform_(0.5, 1.5, generator=gen)
        elif name.endswith("router") or name == "embed":
            t.normal_(0.0, 1.0 / math.sqrt(config.emb_size), generator=gen)
        else:  # dense (non-quantized) matrices
            t.normal_(0.0, 1.0 / math.sqrt(t.shape[-2]), generator=gen)
    return model.eval()


def _fan_in(model: Grok1, scales_name: str) -> int:
    weight = dict(model.named_buffers())[scales_name.replace(".scales", ".weight")]
    return weight.shape[-2]
