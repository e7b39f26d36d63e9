"""The plain transcription of SGLang's Grok-2 forward (tests/grok2_reference.py), loaded through
grok1.checkpoint.grok2, reproduces the public golden's logits (../shared/grok2/golden).

Bounds from golden/README.md: float32 math on the bf16 weights, rel <= 1e-4 and every
per-position rel <= 1e-3. Measured on a 2-core x86 CPU: float64 rel 2.6e-7 (worst position
8.8e-7; the golden itself is float64 rounded to float32), float32 rel 5.9e-6 (worst 4.9e-5).
"""

import grok2_reference as ref
import numpy as np
import pytest
import torch
from grok2_reference import GOLDEN2

from grok1.checkpoint import grok2
from grok1.config_grok2 import Grok2Config


@pytest.fixture(scope="module")
def golden_case(golden2_dir):
    config = Grok2Config.from_json(golden2_dir / "config.json")
    tensors = dict(grok2.read(golden2_dir, config))
    case = np.load(golden2_dir / "golden.npz")
    return config, tensors, torch.from_numpy(case["tokens"]), torch.from_numpy(case["logits"])


def rel(out: torch.Tensor, golden: torch.Tensor) -> tuple[float, float]:
    """(rel L2 over all logits, worst per-position rel L2), the golden README's measures."""
    diff, g = (out.double() - golden.double()), golden.double()
    return (diff.norm() / g.norm()).item(), (diff.norm(dim=-1) / g.norm(dim=-1)).max().item()


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 2e-6), (torch.float32, 1e-4)])
def test_reference_reproduces_golden_logits(golden_case, dtype, bound):
    config, tensors, tokens, golden = golden_case
    assert tokens.shape == (3, 32) and golden.shape == (3, 32, 1024)
    out = ref.forward(tensors, config, tokens, dtype)
    total, worst = rel(out, golden)
    assert total <= bound, f"{dtype}: rel {total:.2e}"
    assert worst <= 10 * bound, f"{dtype}: worst position rel {worst:.2e}"
    assert (out.argmax(-1) == golden.argmax(-1)).all()


@pytest.mark.parametrize("feature, change", [
    ("attention temperature", {"attn_temperature_len": -1}),  # what vLLM does
    ("final softcap", {"final_logit_softcap": 0.0}),
    ("router softcap", {"router_logit_softcap": 0.0}),
    ("attention softcap", {"attn_logit_softcap": 0.0}),
    ("dense MLP", {"residual_moe": False}),
])
def test_every_feature_moves_the_logits_past_the_float32_bound(golden_case, feature, change):
    """The check above can fail: turning any Grok-2 feature off (golden README's sensitivity
    table) moves the logits by far more than 1e-4."""
    config, tensors, tokens, golden = golden_case
    out = ref.forward(tensors, config.replace(**change), tokens[:1], torch.float64)
    assert rel(out, golden[:1])[0] > 1e-2, feature


def test_temperature_matches_spec_examples():
    """SPEC 2.4 step 5, Grok-2's L = 1024: n = 2048 -> 1.1, 8192 -> 1.3, 131071 -> 1.7."""
    n = torch.tensor([0, 1024, 1025, 2048, 8192, 131071])
    t = ref.temperature(n, 1024, torch.float64)
    assert t[:2].tolist() == [1.0, 1.0]
    torch.testing.assert_close(t[3:], torch.tensor([1.1, 1.3, 1.7], dtype=torch.float64),
                               rtol=0, atol=1e-4)
    assert 1.0 < t[2] < 1.0002


@pytest.mark.parametrize("tp_size", [2, 4, 8])
def test_tensor_parallel_slices_give_the_same_logits(golden_case, tp_size):
    """The split tp_want asks for is the right one: ranks computing from their own slices only
    (kv heads replicated past 2 ranks) sum to the one-process logits."""
    config, tensors, tokens, golden = golden_case
    ranks = [dict(grok2.read(GOLDEN2, config, grok2.tp_want(config, r, tp_size)))
             for r in range(tp_size)]
    out = ref.forward_tensor_parallel(ranks, config, tokens[:2])
    one = ref.forward(tensors, config, tokens[:2])
    torch.testing.assert_close(out, one, rtol=1e-9, atol=1e-9)
    assert rel(out, golden[:2])[0] <= 2e-6
