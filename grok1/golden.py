"""golden/README.md's pass criteria, for every path judged by the reference's logits.

The golden folder (../shared/grok1/golden) holds a small Grok-1-architecture checkpoint in the
release format and the logits xAI's JAX code computed for it. A path (the plain model, torchrun
ranks, the engine on a GPU) yields, per case, (our logits, golden logits) pairs over the
meaningful positions (`golden_pairs` for the plain model); `golden_metrics` turns them into
the README's figures and `golden_pass` applies its bounds:
1. each case: relative L2 <= 0.15;
2. pooled: share of positions whose own relative L2 <= 0.02 is >= 0.65;
3. pooled: share of positions where the golden logit of our argmax is within one bf16 ulp of the
   golden maximum (the golden has exact bf16 ties) is >= 0.85.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from grok1.config import GrokConfig
from grok1.model import Grok1, KVCache

CASE_BOUND = 0.15
SHARE_BOUND = 0.65
TOP1_BOUND = 0.85
CLOSE = 0.02  # a position is "close" within 2 % relative L2

Pairs = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


def load_cases(folder: str | Path) -> dict[str, np.ndarray]:
    return dict(np.load(Path(folder) / "golden.npz"))


def golden_pairs(model: Grok1, cases: dict[str, np.ndarray],
                 kv_config: GrokConfig | None = None) -> Pairs:
    """(our logits, golden logits) per meaningful position of each golden case, through the
    plain model: `full` and `padded` (the pad row's real positions) in one forward each, then
    the golden's cache case, `prefill` (last position) and `decode` (one token a step).
    `kv_config`: what the KV cache is allocated from (a sharded model's local head counts);
    default the model's config. Logits are f32 on the CPU."""
    device = model.embed.device

    def tok(a) -> torch.Tensor:
        return torch.as_tensor(a).long().to(device)

    def ref(name: str) -> torch.Tensor:
        return torch.as_tensor(cases[name]).float()

    pairs: Pairs = {}
    with torch.no_grad():
        full = model(tok(cases["full_tokens"])).float().cpu()
        pairs["full"] = [(full[b, t], ref("full_logits")[b, t]) for b in range(full.shape[0])
                         for t in range(full.shape[1])]
        padded_tokens = tok(cases["padded_tokens"])
        padded = model(padded_tokens).float().cpu()
        real = int((padded_tokens[0] != model.config.pad_token).sum())
        pairs["padded"] = [(padded[0, t], ref("padded_logits")[0, t]) for t in range(real)]
        cache = KVCache.allocate(kv_config or model.config, 1, model.config.sequence_len, device)
        length = tok(cases["prefill_length"])
        prefill = model(tok(cases["prefill_tokens"]), cache, lengths_B=length,
                        last_only=True).float().cpu()
        pairs["prefill"] = [(prefill[0, 0], ref("prefill_last_logits")[0, 0])]
        pairs["decode"] = []
        for i, token in enumerate(cases["decode_tokens"].tolist()):
            logits = model(torch.tensor([[token]], device=device), cache).float().cpu()
            pairs["decode"].append((logits[0, 0], ref("decode_logits")[i]))
        assert int(cache.lengths_B[0]) == int(length[0]) + len(pairs["decode"])
    return pairs


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def top1_within_ulp(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether the golden logit of our argmax is within one bf16 ulp of the golden maximum."""
    ulp = 2.0 ** (math.floor(math.log2(float(ref.abs().max()))) - 7)  # 8 significant bits
    return float(ref[out.argmax()]) >= float(ref.max()) - ulp


def golden_metrics(pairs: Pairs) -> dict[str, float]:
    """Each case's relative L2 (`rel_l2_<case>`), the pooled share of positions within 2 %
    (`share_within_2pct`) and the pooled top-1 share (`top1_within_ulp`)."""
    out: dict[str, float] = {}
    errs, top1 = [], []
    for case, items in pairs.items():
        ours = torch.stack([o for o, _ in items]).float()
        ref = torch.stack([r for _, r in items]).float()
        out[f"rel_l2_{case}"] = rel_l2(ours, ref)
        errs += [rel_l2(o, r) for o, r in items]
        top1 += [top1_within_ulp(o, r) for o, r in items]
    out["share_within_2pct"] = sum(e <= CLOSE for e in errs) / len(errs)
    out["top1_within_ulp"] = sum(top1) / len(top1)
    out["positions"] = len(errs)
    return out


def golden_pass(m: dict[str, float]) -> bool:
    cases_ok = all(v <= CASE_BOUND for k, v in m.items() if k.startswith("rel_l2_"))
    return cases_ok and m["share_within_2pct"] >= SHARE_BOUND and m["top1_within_ulp"] >= TOP1_BOUND


# ---- Grok-2 (../shared/grok2/golden/README.md) ------------------------------------------------
# Rows of tokens prefilled from position 0 and SGLang's logits at every position. Bounds: float32
# rel <= 1e-4 and every position's rel <= 1e-3; bf16 end to end rel <= 0.07, median per-position
# rel <= 0.06, top-1 agreement >= 0.87.
GROK2_F32 = {"rel": 1e-4, "worst": 1e-3}
GROK2_BF16 = {"rel": 0.07, "median": 0.06, "top1": 0.87}


def grok2_figures(out: torch.Tensor, golden: torch.Tensor) -> dict[str, float]:
    """The Grok-2 golden README's measures of logits [..., V] against the golden's: rel L2 over
    all logits, per-position rel (worst, median), top-1 agreement."""
    golden = torch.as_tensor(golden).double()
    diff = out.double() - golden
    per_position = diff.norm(dim=-1) / golden.norm(dim=-1)
    return {"rel": (diff.norm() / golden.norm()).item(), "worst": per_position.max().item(),
            "median": per_position.median().item(),
            "top1": (out.argmax(-1) == golden.argmax(-1)).double().mean().item()}


def grok2_bf16_pass(f: dict[str, float]) -> bool:
    return (f["rel"] <= GROK2_BF16["rel"] and f["median"] <= GROK2_BF16["median"]
            and f["top1"] >= GROK2_BF16["top1"])
