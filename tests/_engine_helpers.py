"""Shared settings and builders for the engine and ops tests: random models with real margins
(grok1.random_weights with PEAKED), quantized expert Linears; driving an engine with requests
joining mid-run and checking it against the plain model."""

import torch

from grok1.model import Linear
from grok1.quant import INT8, WeightFormat, quantize_as


# grok1.random_weights at a large std (peaked logits, so greedy margins beat bf16 noise) and a
# decisive router (router logits of std ~8: bf16 noise does not swap the top-2 experts)
PEAKED = {"std": 0.3, "router_std": 8.0}


def quantized_linears(E, D, F, quant: bool | WeightFormat, seed: int = 0, device: str = "cpu"):
    """Three expert Linears (gate, up: [E, D, F]; down: [E, F, D]): int8 (`quant` True; 1, 1
    and 8 scale groups, as released), another format (`quant` a WeightFormat: int4, fp8) or
    bf16 (False), each quantized from a random normal matrix."""
    g = torch.Generator().manual_seed(seed)
    fmt = INT8 if quant is True else quant or None
    out = []
    for d_in, d_out, groups in [(D, F, 1), (D, F, 1), (F, D, 8)]:
        w = torch.randn(E, d_in, d_out, generator=g) / d_in ** 0.5
        lin = Linear(d_in, d_out, experts=E, weights=fmt, quant_groups=groups if fmt else None)
        with torch.no_grad():
            if fmt:
                q, s = quantize_as(fmt, w, groups)
                lin.weight.copy_(q)
                lin.scales.copy_(s)
            else:
                lin.weight.copy_(w.to(torch.bfloat16))
        out.append(lin.to(device))
    return out


def drive(engine, prompts: dict, params, join_every: int = 2):
    """Add two requests, then one more every `join_every` steps while others run. `params`: one
    SamplingParams for all, or a dict request id -> SamplingParams."""
    ids = list(prompts)
    got = {r: [] for r in ids}
    per = params if isinstance(params, dict) else dict.fromkeys(ids, params)
    for r in ids[:2]:
        engine.add_request(r, prompts[r], per[r])
    nxt, step = 2, 0
    while engine.has_unfinished_requests() or nxt < len(ids):
        if step % join_every == join_every - 1 and nxt < len(ids):
            engine.add_request(ids[nxt], prompts[ids[nxt]], per[ids[nxt]])
            nxt += 1
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        step += 1
    return got


def check_against_plain_model(model, engine, prompts, got, tol, min_clear=0.5):
    """Each generated token's engine logits vs the plain forward over prompt + outputs; greedy
    tokens equal wherever the plain model's top-1 margin is real (> 0.1), and at least
    `min_clear` of the positions must have such a margin."""
    for rid, prompt in prompts.items():
        full = torch.tensor([prompt + got[rid]], device=model.embed.device)
        with torch.no_grad():
            ref = model(full)[0].float().cpu()
        L, n = len(prompt), len(got[rid])
        ref = ref[L - 1:L - 1 + n]
        eng = torch.stack(engine.logits_log[rid])
        assert eng.shape == ref.shape
        err = ((eng - ref).norm() / ref.norm()).item()
        assert err < tol, f"{rid}: logits relative error {err:.2e}"
        top2 = ref.topk(2, dim=-1).values
        margin_ok = (top2[:, 0] - top2[:, 1]) > 0.1  # real margins only (bf16 noise ~1e-2)
        assert margin_ok.float().mean() >= min_clear, "margins too small for a greedy check"
        same = ref.argmax(-1) == torch.tensor(got[rid])
        # tokens agree wherever the plain model's margin is real (the history is the engine's
        # own, so one near-tie flip cannot cascade)
        assert bool(same[margin_ok].all()), f"{rid}: greedy token differs at a clear margin"
