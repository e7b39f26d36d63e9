"""The reference math on tiny random models: cache, ragged batches, layouts, quantization."""

import math

import pytest
import torch

from grok1 import random_weights
from grok1.config import GrokConfig
from grok1.model import KVCache, apply_rope, moe_ref, rope_cos_sin, route
from grok1.quant import dequantize, quantize


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.fixture(scope="module")
def model():
    return random_weights(GrokConfig.preset("tiny"), seed=1)


def test_decode_through_cache_equals_full_forward(model):
    torch.manual_seed(0)
    tokens = torch.randint(1, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.allocate(model.config, 2, 16)
        step = [model(tokens[:, :5], cache)[:, -1]]
        for t in range(5, 12):
            step.append(model(tokens[:, t:t + 1], cache)[:, 0])
    # same products in a different grouping: a few bf16 steps at most (bf16 eps = 2^-8)
    assert rel(torch.stack(step, 1), full[:, 4:]) < 1e-2
    assert cache.lengths_B.tolist() == [12, 12]


def test_ragged_batch_rows_equal_rows_run_alone(model):
    torch.manual_seed(1)
    prompts = [torch.randint(1, model.config.vocab_size, (n,)) for n in (3, 9, 6)]
    decode = torch.randint(1, model.config.vocab_size, (3, 4))
    batch = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = p
    with torch.no_grad():
        cache = KVCache.allocate(model.config, 3, 16)
        lengths = torch.tensor([len(p) for p in prompts])
        together = [model(batch, cache, lengths_B=lengths, last_only=True)[:, 0]]
        for t in range(4):
            together.append(model(decode[:, t:t + 1], cache)[:, 0])
        for i, p in enumerate(prompts):
            alone_cache = KVCache.allocate(model.config, 1, 16)
            alone = [model(p[None], alone_cache)[:, -1]]
            for t in range(4):
                alone.append(model(decode[i:i + 1, t:t + 1], alone_cache)[:, 0])
            for step, (a, b) in enumerate(zip(alone, together)):
                assert rel(b[i], a[0]) < 1e-2, (i, step)


def test_pad_tokens_are_masked_as_keys(model):
    torch.manual_seed(2)
    tokens = torch.randint(1, model.config.vocab_size, (1, 8))
    padded = tokens.clone()
    padded[0, 2] = model.config.pad_token
    other = padded.clone()
    with torch.no_grad():
        a, b = model(padded), model(torch.cat([padded[:, :2], tokens[:, 2:3] * 0, padded[:, 3:]], 1))
    assert torch.equal(a, b)
    # the pad key is invisible: changing what stands at a later pad position changes nothing
    other[0, 7] = model.config.pad_token
    with torch.no_grad():
        c = model(other)
    assert torch.equal(c[0, :7], a[0, :7])


def test_rope_is_half_split_not_interleaved():
    torch.manual_seed(3)
    x = torch.randn(1, 3, 2, 8).to(torch.bfloat16)
    pos = torch.tensor([[0, 1, 5]])
    cos, sin = rope_cos_sin(pos, 8)
    out = apply_rope(x, cos, sin).float()
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    ang = 5 * inv  # position 5, pair (d, d + 4) rotated by inv[d]
    x5 = x[0, 2].float()
    expect_lo = x5[:, :4] * torch.cos(ang) - x5[:, 4:] * torch.sin(ang)
    expect_hi = x5[:, 4:] * torch.cos(ang) + x5[:, :4] * torch.sin(ang)
    assert torch.allclose(out[0, 2, :, :4], expect_lo, rtol=1e-2, atol=1e-2)
    assert torch.allclose(out[0, 2, :, 4:], expect_hi, rtol=1e-2, atol=1e-2)
    assert torch.equal(out[0, 0], x[0, 0].float())  # position 0 is the identity


def test_dequantize_groups_scale_their_own_rows():
    torch.manual_seed(4)
    w = torch.randint(-127, 128, (2, 16, 5), dtype=torch.int8)
    s = torch.rand(2, 8, 5).to(torch.bfloat16) + 0.1
    d = dequantize(w, s)
    g = 3  # rows 6, 7 belong to group 3
    expect = (w[:, 6:8].float() * s[:, g:g + 1].float()).to(torch.bfloat16)
    assert torch.equal(d[:, 6:8], expect)


def test_quantize_round_trip_is_within_half_a_step():
    torch.manual_seed(5)
    w = torch.randn(32, 6)
    q, s = quantize(w, 8)
    err = (dequantize(q, s).float() - w).abs()
    step = s.float().repeat_interleave(4, dim=0)
    # half a quantization step, plus the final bf16 rounding (2^-9 relative)
    assert bool((err <= 0.5 * step * 1.01 + 2.0 ** -9 * w.abs()).all())


def test_sparse_moe_equals_reference_all_experts_one_hot(model):
    """The reference computes every expert for every (token, slot) and selects with a one-hot."""
    moe = model.layers[0].moe
    torch.manual_seed(6)
    x = (torch.randn(7, model.config.emb_size)).to(torch.bfloat16)
    _, gates, ids = route(x, moe.router, 2)
    sparse = moe_ref(x, gates, ids, moe.w_gate, moe.w_up, moe.w_down)
    E = model.config.num_experts
    g_all = torch.stack([moe.w_gate(x, expert=e) for e in range(E)], 1).float()
    u_all = torch.stack([moe.w_up(x, expert=e) for e in range(E)], 1).float()
    h = torch.nn.functional.gelu(g_all, approximate="tanh") * u_all  # [M, E, F]
    y_all = torch.einsum("mef,efd->med", h, moe.w_down.dense().float())
    one_hot = torch.nn.functional.one_hot(ids, E).float()  # [M, A, E]
    dense = torch.einsum("mae,med,ma->md", one_hot, y_all,
                         gates.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert rel(sparse, dense) < 4e-3  # f32 sums in another order, then one bf16 rounding


def test_gates_are_not_renormalised(model):
    torch.manual_seed(7)
    x = torch.randn(5, model.config.emb_size).to(torch.bfloat16)
    logits, gates, _ = route(x, model.layers[0].moe.router, 2)
    assert torch.allclose(gates, torch.softmax(logits, -1).topk(2).values)
    assert bool((gates.sum(-1) < 1).all())


def test_embedding_and_output_multipliers_are_bf16_rounded():
    m = random_weights(GrokConfig.preset("grok-1").replace(num_layers=1, vocab_size=8, emb_size=128,
                                                         num_q_heads=2, num_kv_heads=1, key_size=64,
                                                         widening_factor=0.1), seed=0)
    assert m.embedding_multiplier == 78.5 and math.isclose(math.sqrt(6144), 78.38367176906169)
    assert m.output_multiplier == 0.578125


def test_cache_overflow_is_a_clear_error(model):
    cache = KVCache.allocate(model.config, 1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache of 4 positions is full"):
        model(torch.randint(1, 10, (1, 5)), cache)


@pytest.mark.parametrize("weights", ["int4", "fp8"])
def test_int4_and_fp8_models_compute_the_dense_model_of_their_dequantized_weights(weights):
    from grok1.model import Grok1
    from grok1.quant import QUANT_GROUPS, quantize_as, weight_format

    config = GrokConfig.preset("tiny")
    int8 = random_weights(config, quantized=True, seed=4)
    fmt = weight_format(weights)
    model = Grok1(config, weights=weights).eval()
    dense = Grok1(config).eval()
    with torch.no_grad():
        for key, t in int8.state_dict().items():
            module, _, attr = key.rpartition(".")
            if module.endswith(tuple(QUANT_GROUPS)) and attr == "weight":
                name = next(k for k in QUANT_GROUPS if module.endswith(k))
                q, s = quantize_as(fmt, int8.get_submodule(module).dense(), QUANT_GROUPS[name])
                model.get_submodule(module).weight.copy_(q)
                model.get_submodule(module).scales.copy_(s)
                dense.get_submodule(module).weight.copy_(model.get_submodule(module).dense())
            elif attr != "scales":
                model.state_dict()[key].copy_(t)
                dense.state_dict()[key].copy_(t)
    state = model.state_dict()
    assert model.weights == fmt and not model.quantized
    assert state["layers.0.moe.w_down.weight"].dtype == fmt.storage_dtype
    assert state["layers.0.moe.w_down.scales"].dtype == torch.bfloat16
    F, D = config.ffn_size, config.emb_size
    if weights == "int4":  # packed input rows; tiny widths fit one group of 128
        assert state["layers.0.moe.w_down.weight"].shape == (8, F // 2, D)
        assert state["layers.0.moe.w_down.scales"].shape == (8, -(-F // 128), D)
    else:
        assert state["layers.0.moe.w_down.scales"].shape == (8, 1, D)
    tokens = torch.randint(1, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, ref, base = model(tokens), dense(tokens), int8(tokens)
    assert torch.equal(out, ref)  # the formats' twin is their dequantization, nothing else
    assert not torch.equal(out, base)  # and they are not int8 in disguise


def test_quantized_true_still_means_int8_and_contradictions_are_refused():
    from grok1.model import Grok1
    from grok1.quant import INT8

    config = GrokConfig.preset("tiny")
    model = Grok1(config, quantized=True)
    assert model.weights == INT8 and model.quantized
    assert Grok1(config, weights="int8").state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="quantized=True means int8 weights, but weights=int4-g"):
        Grok1(config, quantized=True, weights="int4")
    with pytest.raises(ValueError, match="init_weights works on a dense model"):
        Grok1(config, weights="fp8").init_weights()


def test_engine_runs_every_weight_format_on_the_kernels():
    """apply_kernels swaps int8, int4 and fp8 matrices alike for the kernel-backed modules
    (tests/ops: each against its twin), which keep the model's format."""
    from grok1.engine.runner import apply_kernels
    from grok1.model import Grok1
    from grok1.ops.linear import QuantLinear
    from grok1.ops.moe import FusedMoE

    config = GrokConfig.preset("tiny")
    for weights in ("int8", "int4", "fp8"):
        with torch.device("meta"):
            model = Grok1(config, weights=weights)
            fmt = model.weights
            apply_kernels(model)
        assert all(type(layer.moe) is FusedMoE and type(layer.attn.wq) is QuantLinear
                   for layer in model.layers)
        assert model.weights == fmt and model.layers[0].moe.weights == fmt
