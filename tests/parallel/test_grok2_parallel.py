"""Grok-2 under tensor parallelism: the golden's release folder (experts pre-sharded 8 ways)
loaded through grok1.load on 2 and 8 gloo ranks, each rank reading only its slices, gives one
process's logits; a rank's tensors are exactly the slices of the whole model.

Why equality is exact: every partial sum over ranks (wo, the dense MLP's down-projection, each
MoE slot's output, the "dim" logits) stays f64 on the CPU until the all-reduce and is rounded
once (products of bf16 values, and of f32 by bf16, are exact in f64 and their sums nearly so:
the order of the sum does not change the value rounded to f32 in practice), each MoE slot is rounded before the slots add, as one process does (SGLang's
rounding, grok2 SPEC 2.5), and the vocabulary split's logits are whole dot products gathered.
Measured when written: 0.0 difference at TP 2 and 8 (and 2 ranks with whole experts and the
head split along D), float32 and bf16, full and cached.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _grok2_tp_worker import DECODE_STEPS, engine_greedy, run
from grok2_reference import GOLDEN2

import grok1
from grok1.model import BF16
from grok1.parallel.tensor import shard_model_
from grok1.sharding import Layout

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_grok2_tp_worker.py")
TOKENS = 20  # of the golden's 32 per row: positions past attn_temperature_len=8 included


@pytest.fixture(scope="module")
def golden(golden2_dir):
    case = np.load(golden2_dir / "golden.npz")
    return (torch.from_numpy(case["tokens"][:2, :TOKENS].copy()),
            torch.from_numpy(case["logits"][:2, :TOKENS].copy()).double())


@pytest.fixture(scope="module")
def one_process(golden):
    tokens, _ = golden
    with torch.no_grad():
        out = {name: run(grok1.load(GOLDEN2, dtype=dtype, progress=False), tokens)
               for name, dtype in (("float32", torch.float32), ("bf16", BF16))}
    out["engine_tokens"] = engine_greedy(grok1.load(GOLDEN2, progress=False), tokens)
    return out


def torchrun_worker(ranks: int, tokens: torch.Tensor, tmp_path: Path, moe: str = "tp",
                    unembed: str = "vocab") -> dict:
    torch.save(tokens, tmp_path / "tokens.pt")
    out = tmp_path / f"tp{ranks}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", str(WORKER), str(GOLDEN2), str(tmp_path / "tokens.pt"),
           str(out), moe, unembed]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("ranks, moe, unembed", [(2, "tp", "vocab"), (8, "tp", "vocab"),
                                                 (2, "ep", "dim")])
def test_a_grok2_folder_loads_on_2_and_8_gloo_ranks_to_one_process_logits(golden, one_process, ranks,
                                                                  moe, unembed, tmp_path):
    tokens, golden_logits = golden
    got = torchrun_worker(ranks, tokens, tmp_path, moe, unembed)
    shapes = got.pop("rank0_shapes")
    # rank 0 held its share only: 1/ranks of the head's vocabulary (or of D), the dense width,
    # the expert width (or of the experts)
    assert shapes["lm_head.weight"] == ((128, 1024 // ranks) if unembed == "vocab"
                                        else (128 // ranks, 1024))
    assert shapes["layers.0.mlp.w_down.weight"] == (512 // ranks, 128)
    assert shapes["layers.0.moe.w_up.weight"] == ((8, 128, 256 // ranks) if moe == "tp"
                                                  else (8 // ranks, 128, 256))
    assert shapes["embed"] == (1024, 128)
    for name in ("float32", "bf16"):
        for case in ("full", "cached"):
            assert torch.equal(got[f"{name}_{case}"], one_process[name][case]), (name, case)
    # the serving engine on the ranks writes one process's engine's greedy tokens
    assert got["engine_tokens"] == one_process["engine_tokens"]
    rel = (got["float32_full"].double() - golden_logits).norm() / golden_logits.norm()
    assert rel <= 1e-4  # golden/README's float32 bound (measured 6.2e-7)


def test_the_workers_cached_decode_equals_its_full_forward(one_process):
    """So that "cached" above checks the KV cache of the rank's local shape, not nothing: the
    positions decoded one by one equal the full forward's (both on the CPU's f64-evaluated
    steps: measured equal to the bit, float32 and bf16)."""
    for name in ("float32", "bf16"):
        full, cached = one_process[name]["full"], one_process[name]["cached"]
        assert torch.equal(cached, full[:, TOKENS - 1 - DECODE_STEPS:TOKENS - 1]), name


@pytest.mark.parametrize("layout", [Layout(8, 3), Layout(2, 1, moe="ep", unembed="dim"),
                                    Layout(4, 2, attn="none", moe="ep", unembed="none")])
def test_a_ranks_grok2_tensors_are_the_slices_of_the_whole_model(golden, layout):
    whole = grok1.load(GOLDEN2, progress=False)
    loaded = grok1.load(GOLDEN2, layout=layout, progress=False).state_dict()
    sliced = shard_model_(copy.deepcopy(whole), layout).state_dict()
    assert loaded.keys() == sliced.keys()
    for key in sliced:
        assert loaded[key].dtype == sliced[key].dtype and torch.equal(loaded[key], sliced[key]), key


def _small_grok2():
    """Grok-2's ratios at a small width (8 q / 2 kv heads, 8 experts top-2, a dense MLP)."""
    from grok1.config_grok2 import Grok2Config

    return Grok2Config(vocab_size=512, emb_size=64, key_size=16, num_q_heads=8, num_kv_heads=2,
                       num_layers=2, expert_width=48, dense_width=96)


def test_random_grok2_weights_have_the_releases_shapes_and_run():
    from grok1.checkpoint import grok2

    config = _small_grok2()
    model = grok1.random_weights(config, seed=1)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == grok2.grok1_shapes(config)
    assert model.weights is None and state["lm_head.weight"].dtype == BF16  # the release's form
    assert model.config == config.to_grok_config()
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    # Grok-2's final cap bounds the logits by 50; random weights of std 0.02 give spread logits
    assert logits.shape == (2, 12, 512) and logits.isfinite().all()
    assert 0 < logits.abs().max() < 50 and logits.std() > 1e-3
    again = grok1.random_weights(config, seed=1).state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)
    int8 = grok1.random_weights(config, quantized=True, seed=1)
    assert int8.layers[0].attn.wq.quantized and int8.layers[0].mlp.w_up.weight.dtype == BF16


@pytest.mark.parametrize("layout", [Layout(4, 3), Layout(2, 0, moe="ep", unembed="dim")])
def test_a_ranks_random_grok2_weights_are_the_slices_of_the_whole_model(layout):
    config = _small_grok2()
    whole = grok1.random_weights(config, seed=2)
    rank = grok1.random_weights(config, seed=2, layout=layout).state_dict()
    sliced = shard_model_(copy.deepcopy(whole), layout).state_dict()
    assert rank.keys() == sliced.keys()
    assert all(torch.equal(rank[k], sliced[k]) for k in sliced)
    assert rank["lm_head.weight"].shape != whole.state_dict()["lm_head.weight"].shape
