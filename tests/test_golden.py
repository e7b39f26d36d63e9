"""The golden logits of xAI's JAX reference (../shared/grok1/golden) through the public API.

Pass criteria are golden/README.md's: per case relative L2 <= 0.15; pooled share of positions
with relative L2 <= 0.02 at least 0.65; pooled top-1 (our argmax's golden logit within one bf16
ulp of the golden maximum) at least 0.85. We also hold ourselves to what a bf16-faithful port
reaches (0.99 % on the full case, the same on every CPU), so a drift in rounding points fails
loudly.
"""

import numpy as np
import pytest
import torch

import grok1
from grok1.golden import golden_metrics, golden_pairs, load_cases


@pytest.fixture(scope="module")
def golden(golden_dir):
    model = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json")
    return model, load_cases(golden_dir)


@pytest.fixture(scope="module")
def cases(golden):
    """(name, [(our logits, golden logits) per meaningful position])."""
    model, g = golden
    return golden_pairs(model, g)


@pytest.fixture(scope="module")
def metrics(cases):
    """golden/README.md's figures (grok1.golden): per case relative L2, pooled share, top-1."""
    return golden_metrics(cases)


@pytest.mark.parametrize("case", ["full", "padded", "prefill", "decode"])
def test_each_golden_case_within_relative_error(metrics, case):
    err = metrics[f"rel_l2_{case}"]
    assert err <= 0.15, f"{case}: relative L2 {err:.4f} > 0.15 (README bound)"
    assert err <= 0.02, f"{case}: relative L2 {err:.4f}; a bf16-faithful port gets < 0.01"


def test_pooled_share_of_close_positions_and_top1(metrics):
    share, top1 = metrics["share_within_2pct"], metrics["top1_within_ulp"]
    assert share >= 0.65, f"share of positions within 2 %: {share:.3f} < 0.65"
    assert top1 >= 0.85, f"top-1 within one bf16 ulp: {top1:.3f} < 0.85"
    # what this port measured when the test was written: every position within 2 %, all top-1
    assert share >= 0.95 and top1 >= 0.95, (share, top1)


def test_golden_model_loads_with_release_layout(golden, golden_dir):
    model, _ = golden
    assert isinstance(model, torch.nn.Module) and not model.training
    layer = model.layers[10]  # file order sorts layer names as strings: 0, 1, 10, 2, ...
    assert layer.attn.wo.weight.dtype == torch.int8
    assert layer.attn.wo.scales.shape == (8, model.config.emb_size)
    assert layer.moe.w_down.scales.shape == (8, 8, model.config.emb_size)
    assert layer.moe.router.dtype == torch.float32


_FULL_LOGITS_SCRIPT = """
import sys, numpy as np, torch, grok1
from pathlib import Path
golden = Path(sys.argv[1])
model = grok1.load(golden / "checkpoint", config=golden / "config.json")
tokens = torch.from_numpy(np.load(golden / "golden.npz")["full_tokens"]).long()
with torch.no_grad():
    np.save(sys.argv[2], model(tokens).float().numpy())
"""


def test_golden_logits_are_the_same_with_scalar_and_vectorized_cpu_kernels(golden, golden_dir,
                                                                          tmp_path):
    """torch's vectorized CPU kernels (AVX2, AVX-512, ...) and its scalar ones
    (ATEN_CPU_CAPABILITY=default) must give the same logits to the bit: the model's f32 math
    runs in f64 on the CPU (model.wide_dtype), so no machine's summation order or tanh/exp
    approximation reaches a rounding point. (Before: 1.1 % from the golden vectorized on an
    AVX-512-BF16 EPYC, 0.44 % scalar.)"""
    import os
    import subprocess
    import sys

    outs = {}
    for capability in ("default", "avx2"):
        out = tmp_path / f"{capability}.npy"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        subprocess.run([sys.executable, "-c", _FULL_LOGITS_SCRIPT, str(golden_dir), str(out)],
                       env=env, check=True, capture_output=True, timeout=300)
        outs[capability] = np.load(out)
    model, g = golden
    with torch.no_grad():
        here = model(torch.from_numpy(g["full_tokens"]).long()).float().numpy()
    assert np.array_equal(outs["default"], outs["avx2"])
    assert np.array_equal(outs["default"], here), torch.backends.cpu.get_cpu_capability()
