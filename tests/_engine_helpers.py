"""Shared builders for the engine and ops tests: random models with real margins, quantized."""

import torch

from grok1.config import GrokConfig
from grok1.model import Grok1, Linear
from grok1.quant import QUANT_GROUPS, quantize


def random_model(config: GrokConfig, *, quantized: bool, seed: int = 0, std: float = 0.3,
                 device: str = "cpu") -> Grok1:
    """init_weights at a large std (peaked logits, so greedy margins beat bf16 noise), then
    optionally quantized into the release's int8 + bf16-scales form."""
    dense = Grok1(config)
    dense.init_weights(torch.Generator().manual_seed(seed), std=std)
    with torch.no_grad():
        for layer in dense.layers:
            layer.moe.router.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    if not quantized:
        return dense.to(device).eval()
    model = Grok1(config, quantized=True)
    state = {}
    for name, t in dense.state_dict().items():
        mod_name = name.rsplit(".", 1)[0]
        key = next((k for k in QUANT_GROUPS if mod_name.endswith(k)), None)
        if key is not None and name.endswith(".weight"):
            q, s = quantize(t, QUANT_GROUPS[key])
            state[name], state[name.replace(".weight", ".scales")] = q, s
        else:
            state[name] = t
    model.load_state_dict(state)
    return model.to(device).eval()


def quantized_linears(E, D, F, quant: bool, seed: int = 0, device: str = "cpu"):
    """Three expert Linears (gate, up: [E, D, F], 1 group; down: [E, F, D], 8 groups)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d_in, d_out, groups in [(D, F, 1), (D, F, 1), (F, D, 8)]:
        w = torch.randn(E, d_in, d_out, generator=g) / d_in ** 0.5
        lin = Linear(d_in, d_out, experts=E, quant_groups=groups if quant else None)
        with torch.no_grad():
            if quant:
                q, s = quantize(w, groups)
                lin.weight.copy_(q)
                lin.scales.copy_(s)
            else:
                lin.weight.copy_(w.to(torch.bfloat16))
        out.append(lin.to(device))
    return out
