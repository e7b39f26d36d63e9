"""Grok2Config: the published config.json's fields mapped or refused, and the derived sizes."""

import json

import pytest

from grok1.config import ConfigError
from grok1.config_grok2 import Grok2Config

# xai-org/grok-2's config.json as SPEC.md section 3 lists it (from copies C1/C2)
RELEASE = {
    "architectures": ["Grok1ForCausalLM"], "model_type": "git", "torch_dtype": "bfloat16",
    "vocab_size": 131072, "hidden_size": 8192, "num_hidden_layers": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 32768, "moe_intermediate_size": 16384, "num_local_experts": 8,
    "num_experts_per_tok": 2, "residual_moe": True, "rms_norm_eps": 1e-05,
    "embedding_multiplier_scale": 90.50966799187809, "output_multiplier_scale": 0.5,
    "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0,
    "final_logit_softcapping": 50, "attn_temperature_len": 1024, "rope_theta": 208533496,
    "rope_type": "original", "original_max_position_embeddings": 8192, "scaling_factor": 16.0,
    "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 8, "beta_slow": 1,
    "max_position_embeddings": 131072, "sliding_window_size": -1, "global_attn_every_n": 1,
}


def test_release_config_maps_to_the_defaults_and_spec_sizes():
    c = Grok2Config.from_hf_dict(RELEASE)
    assert c == Grok2Config()  # the defaults are the release's values
    assert (c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads) == (8192, 128, 64, 8)
    assert (c.expert_width, c.dense_width, c.residual_moe) == (16384, 32768, True)
    assert (c.attn_logit_softcap, c.router_logit_softcap, c.final_logit_softcap) == (30, 30, 50)
    assert (c.attn_temperature_len, c.rope_theta, c.sequence_len) == (1024, 208533496, 131072)
    # SPEC section 1: 269.5 B parameters (539 GB in bf16), 114.9 B touched per token
    assert round(c.num_parameters / 1e9, 1) == 269.5
    assert round(c.active_parameters / 1e9, 1) == 114.9
    assert round(c.weight_bytes() / 1e9) == 539
    assert c.kv_bytes_per_token() == 2 * 64 * 8 * 128 * 2  # 256 KiB of bf16 K and V per token


def test_golden_config_parses(tmp_path):
    from grok2_reference import GOLDEN2
    path = GOLDEN2 / "config.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    c = Grok2Config.from_json(path)
    assert (c.emb_size, c.num_layers, c.num_q_heads, c.num_kv_heads, c.key_size) == \
        (128, 4, 8, 2, 16)
    assert (c.expert_width, c.dense_width, c.vocab_size, c.attn_temperature_len) == \
        (256, 512, 1024, 8)


@pytest.mark.parametrize("field, value, words", [
    ("rope_type", "yarn", "rope_type='yarn': not implemented"),
    ("rope_type", "dynamic", "rope_type='dynamic': unknown rope type"),
    ("sliding_window_size", 4096, "sliding_window_size=4096: sliding-window attention"),
    ("global_attn_every_n", 4, "global_attn_every_n=4"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True"),
    ("model_type", "llama", "model_type='llama'"),
    ("architectures", ["LlamaForCausalLM"], "not a Grok-2 config"),
    ("attn_logit_softcapping_method", "clip", "attn_logit_softcapping_method='clip'"),
    ("num_attention_heads", 63, "num_q_heads=63 must be a multiple of num_kv_heads=8"),
    ("hidden_size", "8192", "hidden_size='8192': expected int"),
    ("residual_moe", 1, "residual_moe=1: expected bool"),
    ("torch_dtype", "int8", "torch_dtype='int8'"),
    ("use_flash_attention", True, "unknown field(s) use_flash_attention=True"),
])
def test_unsupported_field_is_refused_naming_field_and_value(field, value, words):
    with pytest.raises(ConfigError) as e:
        Grok2Config.from_hf_dict({**RELEASE, field: value}, source="grok-2/config.json")
    assert words in str(e.value)
    assert str(e.value).startswith("grok-2/config.json:")


def test_missing_required_field_is_named():
    fields = {k: v for k, v in RELEASE.items() if k != "num_key_value_heads"}
    with pytest.raises(ConfigError, match="missing field num_key_value_heads"):
        Grok2Config.from_hf_dict(fields)


def test_optional_fields_take_sglangs_defaults():
    """SGLang reads head_dim with default 128, moe_intermediate_size falling back to
    intermediate_size, no temperature (-1) and no final cap when absent (SPEC 3)."""
    optional = ("head_dim", "moe_intermediate_size", "attn_temperature_len",
                "final_logit_softcapping", "residual_moe")
    c = Grok2Config.from_hf_dict({k: v for k, v in RELEASE.items() if k not in optional})
    assert (c.key_size, c.expert_width, c.attn_temperature_len) == (128, 32768, -1)
    assert (c.final_logit_softcap, c.residual_moe, c.dense_width) == (0.0, False, 0)
    assert c.num_parameters < Grok2Config().num_parameters * 2  # experts at the dense width


def test_inert_rope_fields_change_nothing_but_the_cache_length():
    c = Grok2Config.from_hf_dict({**RELEASE, "beta_fast": 32, "attn_factor": 0.7,
                                  "scaling_factor": 2.0})
    assert c == Grok2Config(sequence_len=16384)  # 8192 * 2 positions in SGLang's cos/sin cache


def test_from_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Grok2Config.from_json(bad)
    bad.write_text(json.dumps({**RELEASE, "rope_theta": 1}))
    with pytest.raises(ConfigError, match=r"config.json: rope_theta=1: must be a RoPE base"):
        Grok2Config.from_json(bad)
