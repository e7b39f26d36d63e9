"""Grok-2 through model.py (the same model code as Grok-1, switched by config fields), judged by
the public golden (../shared/grok2/golden) on the CPU, and Grok-1 unchanged by the switches.

Bounds from golden/README.md: float32 rel <= 1e-4 and every per-position rel <= 1e-3; bf16 rel
<= 0.07, median per-position rel <= 0.06, top-1 agreement >= 0.87. Measured when this test was
written (2-core x86 CPU; f32 steps evaluated in f64 on the CPU, model.wide_dtype): float32 rel
1.2e-6 (worst position 6.4e-6); bf16 rel 0.0485, median per-position 0.0344, worst 0.152,
top-1 0.969 (the README's emulation of SGLang's bf16 points: 0.0448, 0.0357, 0.1016, 0.969).
"""

import hashlib

import grok2_reference as ref
import numpy as np
import pytest
import torch
from grok2_reference import GOLDEN2

import grok1
from grok1.checkpoint import grok2
from grok1.checkpoint.names import assign_tensor
from grok1.config import ConfigError, GrokConfig
from grok1.config_grok2 import Grok2Config
from grok1.engine.runner import PagedContext
from grok1.golden import grok2_figures as figures
from grok1.golden import load_cases
from grok1.model import BF16, ForwardContext, Grok1, KVCache


@pytest.fixture(scope="module")
def golden_case(golden2_dir):
    case = np.load(golden2_dir / "golden.npz")
    return torch.from_numpy(case["tokens"]), torch.from_numpy(case["logits"]).double()


@pytest.fixture(scope="module")
def models(golden_case):
    """The golden checkpoint through the front door (grok1.load -> load_grok2), by compute
    dtype."""
    return {dtype: grok1.load(GOLDEN2, dtype=dtype) for dtype in (torch.float32, BF16)}


def from_tensors(config: GrokConfig, tensors: dict[str, torch.Tensor],
                 compute_dtype: torch.dtype) -> Grok1:
    """A model of `config` holding `tensors` (grok1 names), as load_grok2 builds one."""
    with torch.device("meta"):
        model = Grok1(config, compute_dtype=compute_dtype)
    targets = model.state_dict(keep_vars=True)
    assert targets.keys() == tensors.keys()
    for name, t in tensors.items():
        assign_tensor(model, name, t.to(targets[name].dtype))
    return model.eval()


def test_float32_golden_through_model(golden_case, models):
    tokens, golden = golden_case
    model = models[torch.float32]
    assert model.compute_dtype == torch.float32 and model.lm_head is not None
    with torch.no_grad():
        out = model(tokens)
    assert out.dtype == torch.float32 and out.shape == golden.shape
    f = figures(out, golden)
    assert f["rel"] <= 1e-4 and f["worst"] <= 1e-3, f  # the README's float32 bound
    assert f["rel"] <= 1e-5 and f["top1"] == 1.0, f  # measured 1.2e-6: a drift fails loudly


def test_bf16_golden_through_model(golden_case, models):
    tokens, golden = golden_case
    model = models[BF16]  # load_grok2's default: SGLang's bf16 storage points
    assert model.compute_dtype == BF16
    with torch.no_grad():
        out = model(tokens)
    f = figures(out, golden)
    assert f["rel"] <= 0.07 and f["median"] <= 0.06 and f["top1"] >= 0.87, f  # README's bounds
    assert 0.03 <= f["rel"] <= 0.06, f  # measured 0.0485: bf16 noise, not f32 math in disguise


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_decode_through_kv_cache_equals_full_forward(golden_case, models, dtype):
    """Prefill 5 tokens, then one token per step to position 15: the attention temperature
    (L = 8) and the RoPE base act at every decoded position; each step's logits equal the full
    forward's at that position."""
    tokens, _ = golden_case
    model = models[dtype]
    row = tokens[1:2, :16]
    with torch.no_grad():
        full = model(row)
        cache = KVCache.allocate(model.config, 1, 32, dtype=dtype)
        steps = [model(row[:, :5], cache)]
        steps += [model(row[:, t:t + 1], cache) for t in range(5, 16)]
    decoded = torch.cat(steps, dim=1)
    assert int(cache.lengths_B[0]) == 16
    if dtype == torch.float32:
        torch.testing.assert_close(decoded, full, rtol=1e-6, atol=1e-6)
    else:  # every sum f64 before its one rounding: the same bf16 values
        assert torch.equal(decoded, full)


def test_kv_cache_of_another_dtype_is_refused(golden_case, models):
    model = models[torch.float32]
    cache = KVCache.allocate(model.config, 1, 8)  # bf16
    with pytest.raises(ValueError, match="dtype=model.compute_dtype"):
        model(golden_case[0][:1, :4], cache)


def test_features_off_match_the_reference_with_them_off(golden_case):
    """The golden's weights under a config with the dense MLP, temperature and final cap off:
    model.py follows the reference transcription there too (float32 bound)."""
    tokens, _ = golden_case
    config2 = Grok2Config.from_json(GOLDEN2 / "config.json").replace(
        residual_moe=False, dense_width=0, attn_temperature_len=-1, final_logit_softcap=0.0,
        router_logit_softcap=0.0)
    tensors = {k: v for k, v in grok2.read(GOLDEN2, Grok2Config.from_json(
        GOLDEN2 / "config.json")) if ".mlp." not in k}
    expected = ref.forward(tensors, config2, tokens[:2], torch.float64)
    model = from_tensors(config2.to_grok_config(), tensors, torch.float32)
    assert model.layers[0].mlp is None
    with torch.no_grad():
        f = figures(model(tokens[:2]), expected)
    assert f["rel"] <= 1e-5 and f["worst"] <= 1e-4, f


def test_grok2_model_round_trips_through_the_native_format(tmp_path):
    """A Grok-2-featured model (dense MLP, untied head, caps, temperature) saves and loads as a
    grok1 folder: config.json carries the new fields, model.safetensors mlp.* and lm_head."""
    from grok1.checkpoint.native import load_native, save_native

    config = Grok2Config().replace(vocab_size=256, emb_size=64, key_size=8, num_q_heads=8,
                                   num_kv_heads=2, num_layers=2, expert_width=32,
                                   dense_width=48, attn_temperature_len=4).to_grok_config()
    model = Grok1(config)
    model.init_weights(torch.Generator().manual_seed(3))
    save_native(model, tmp_path / "m")
    loaded = load_native(tmp_path / "m")
    assert loaded.config == config and loaded.lm_head is not None
    assert loaded.layers[1].mlp.w_down.weight.shape == (config.dense_width, config.emb_size)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.parametrize("change", [
    {"attn_temperature_len": 0}, {"final_logit_softcap": 0.0}, {"router_logit_softcap": 0.0},
    {"attn_logit_softcap": 0.0}, {"gelu": "tanh"}, {"rope_theta": 10000.0},
])
def test_each_grok2_switch_is_wired_the_float32_check_sees_it_off(golden_case, change):
    """Turning one Grok-2 field back to Grok-1's value moves the logits past the float32 bound
    (the golden README's sensitivity table: every feature is caught)."""
    tokens, golden = golden_case
    config = Grok2Config.from_json(GOLDEN2 / "config.json")
    tensors = dict(grok2.read(GOLDEN2, config))
    model = from_tensors(config.to_grok_config().replace(**change), tensors, torch.float32)
    with torch.no_grad():
        f = figures(model(tokens[:1]), golden[:1])
    assert f["rel"] > 1e-4, (change, f)


# ---- Grok-1 unchanged ------------------------------------------------------------------------

# sha256 (first 16 hex digits) of the bf16 logits' bytes at the base commit 42cf168, before
# Grok-2's switches: the Grok-1 golden cases (grok1.load) and a tiny random model. The f32 steps
# are evaluated in f64 on the CPU, so these are the same on every CPU (model.wide_dtype).
GROK1_DIGESTS = {"full": "14d4beac15feb992", "padded": "15a116d30a73dee8",
                 "prefill": "973ce7b64415c05a", "decode0": "64ac43444935c177",
                 "decode7": "1be97d0c24f4b62d", "tiny": "271634c4df242aa0"}


def digest(t: torch.Tensor) -> str:
    assert t.dtype == BF16
    return hashlib.sha256(t.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


def test_grok1_golden_logits_bit_identical_to_before(golden_dir):
    model = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json")
    assert model.config.grok2_features() == [] and model.lm_head is None
    g = load_cases(golden_dir)
    got = {}
    with torch.no_grad():
        got["full"] = model(torch.from_numpy(g["full_tokens"]).long())
        got["padded"] = model(torch.from_numpy(g["padded_tokens"]).long())
        cache = KVCache.allocate(model.config, 1, model.config.sequence_len)
        got["prefill"] = model(torch.from_numpy(g["prefill_tokens"]).long(), cache,
                               lengths_B=torch.from_numpy(g["prefill_length"]).long(),
                               last_only=True)
        for i, token in enumerate(g["decode_tokens"].tolist()):
            logits = model(torch.tensor([[token]]), cache)
            if i in (0, 7):
                got[f"decode{i}"] = logits
    for dt in (BF16, torch.float32):  # f32 parameters (training) still compute in bf16
        torch.manual_seed(0)
        tiny = Grok1(GrokConfig.preset("tiny"), dtype=dt)
        tiny.init_weights(torch.Generator().manual_seed(1))
        tok = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(2))
        tok[1, 7:] = 0  # pad keys masked
        with torch.no_grad():
            assert digest(tiny(tok)) == GROK1_DIGESTS["tiny"], dt
    assert {k: digest(v) for k, v in got.items()} == {k: v for k, v in GROK1_DIGESTS.items()
                                                      if k != "tiny"}


# ---- config and the engine's refusal -------------------------------------------------------

def test_grok1_config_json_without_grok2_fields_loads_with_grok1_defaults(tmp_path):
    fields = {k: v for k, v in GrokConfig.preset("tiny").to_dict().items()
              if k not in ("rope_theta", "gelu", "dense_width", "tied_embeddings")}
    (tmp_path / "c.json").write_text(__import__("json").dumps(fields))
    config = GrokConfig.from_json(tmp_path / "c.json")
    assert config == GrokConfig.preset("tiny") and config.grok2_features() == []
    assert config.ffn_size == 256 and not config.residual_moe


@pytest.mark.parametrize("field, value, message", [
    ("gelu", "relu", "gelu='relu': expected one of tanh, erf"),
    ("rounding", "xla", "rounding='xla': expected one of jax, sglang"),
    ("attn_logit_softcap", -1.0, "attn_logit_softcap=-1.0: must be a number >= 0"),
    ("attn_temperature_len", -1, "attn_temperature_len=-1: must be an integer >= 0"),
    ("expert_width", 0, "expert_width=0: must be a positive integer or None"),
    ("dense_width", 1.5, "dense_width=1.5: must be an integer >= 0"),
    ("mask_pad_keys", 1, "mask_pad_keys=1: must be true or false"),
    ("rope_theta", 0, "rope_theta=0: must be a positive number"),
])
def test_bad_grok2_field_names_field_and_value(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        GrokConfig.preset("tiny").replace(**{field: value})


def test_grok2_config_becomes_a_grok_config_with_its_features():
    config = Grok2Config().to_grok_config()  # the release's values
    assert config.ffn_size == 16384 and config.dense_width == 32768 and config.residual_moe
    assert config.rope_theta == 208533496 and config.attn_temperature_len == 1024
    assert config.attn_output_multiplier == 128 ** -0.5
    assert (config.attn_logit_softcap, config.router_logit_softcap,
            config.final_logit_softcap) == (30.0, 30.0, 50.0)
    assert not config.tied_embeddings and not config.mask_pad_keys
    assert (config.gelu, config.rounding) == ("erf", "sglang")
    assert Grok2Config(attn_temperature_len=-1).to_grok_config().attn_temperature_len == 0


def test_multipliers_follow_the_rounding_switch():
    tiny = GrokConfig.preset("tiny")  # embedding multiplier sqrt(48) = 6.928..., bf16 6.9375
    with torch.device("meta"):
        jax, sglang = Grok1(tiny), Grok1(tiny.replace(rounding="sglang"))
    assert jax.embedding_multiplier == 6.9375 and jax.output_multiplier == 0.578125
    assert sglang.embedding_multiplier == tiny.embedding_multiplier_scale
    assert sglang.output_multiplier == tiny.output_multiplier_scale


def test_a_bf16_only_context_refuses_float32_compute():
    """The engine's kernels compute in bf16: its context must refuse a float32 model, not
    compute something else."""
    assert PagedContext.bf16_only  # the engine's context inherits the refusal
    with torch.device("meta"):
        plain = Grok1(GrokConfig.preset("tiny"), compute_dtype=torch.float32)
    h = torch.zeros(3, plain.config.emb_size)
    with pytest.raises(NotImplementedError, match="compute_dtype=torch.float32"):
        plain.run_layers(h, ForwardContext())


def test_sharding_a_grok2_model_cuts_its_dense_mlp_and_untied_head():
    from grok1.parallel.tensor import shard_model_
    from grok1.sharding import Layout

    config = GrokConfig.preset("tiny").replace(router_logit_softcap=30.0, dense_width=64,
                                               expert_width=40, tied_embeddings=False)
    with torch.device("meta"):
        by_vocab = shard_model_(Grok1(config), Layout(size=2, rank=1))
        by_dim = shard_model_(Grok1(config), Layout(size=2, rank=0, moe="ep", unembed="dim"))
        whole_mlp = shard_model_(Grok1(config), Layout(size=2, rank=0, attn="none", moe="ep",
                                                       unembed="none"))
    layer = by_vocab.layers[1]
    assert layer.mlp.w_gate.weight.shape == layer.mlp.w_up.weight.shape == (48, 32)
    assert layer.mlp.w_down.weight.shape == (32, 48)
    assert layer.moe.w_up.weight.shape == (8, 48, 20)  # Grok-2's expert width, halved
    assert by_vocab.lm_head.weight.shape == (48, 128)  # vocab columns 128..255
    assert by_vocab.embed.shape == (256, 48)  # the input table stays whole
    assert by_dim.lm_head.weight.shape == (24, 256)  # D rows
    assert by_dim.layers[0].mlp.w_down.weight.shape == (32, 48)
    assert by_dim.layers[0].moe.w_up.weight.shape == (4, 48, 40)  # whole experts
    assert whole_mlp.layers[0].mlp.w_down.weight.shape == (64, 48)  # with attention: whole
    assert whole_mlp.lm_head.weight.shape == (48, 256)
    with pytest.raises(ConfigError, match="--tp 3 must divide dense_width=64"):
        with torch.device("meta"):
            shard_model_(Grok1(config.replace(num_q_heads=3, num_kv_heads=3)),
                         Layout(3, 0, moe="none", unembed="none"))


def test_compute_dtype_other_than_bf16_or_f32_is_refused():
    with pytest.raises(ValueError, match="compute_dtype=torch.float16"):
        Grok1(GrokConfig.preset("tiny"), compute_dtype=torch.float16)


def test_grok2_folder_is_detected_and_a_foreign_config_or_split_refused(golden_case):
    from grok1.loading import detect_format
    from grok1.sharding import Layout

    assert detect_format(GOLDEN2).name == "grok2"
    with pytest.raises(ConfigError, match=r"--tp 3 must divide num_kv_heads=2, or be a "
                                          r"multiple of it dividing num_q_heads=8 \(try 1, 2, 4 or 8\)"):
        grok1.load(GOLDEN2, layout=Layout(3, 0))
    with pytest.raises(ConfigError, match="takes its own config.json"):
        grok1.load(GOLDEN2, config="grok-1")
