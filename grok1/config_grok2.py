"""Grok2Config: xai-org/grok-2's config.json (Grok1ForCausalLM, model_type "git"), strictly parsed.

Every field of the published config (../shared/grok2/SPEC.md section 3) is either mapped to a
field below, checked to be inert (a value that changes nothing, e.g. the YaRN parameters of
rope_type "original", SPEC 2.7), or refused with a ConfigError naming the field and its value;
an unknown field is refused too, so a config we do not understand never loads as something else.

Field names follow GrokConfig's (the reference's) where Grok-1 has the same quantity, so that the
two can be folded into one config later: emb_size, key_size, num_q_heads, num_kv_heads,
num_layers, num_experts, num_selected_experts, the two multipliers. What is new in Grok-2 keeps a
name saying what it is: expert_width, dense_width, the three soft caps, the attention
temperature, rope_theta. Derived sizes (parameters, active per token, bytes) are properties.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from grok1.config import ConfigError, GrokConfig, read_config_json

ARCHITECTURE = "Grok1ForCausalLM"  # the release's architectures[0]; SGLang's class (SPEC 3)
# rope_type values SGLang's grok.py implements (SPEC 2.7); only "original" (plain RoPE) is ours
_ROPE_TYPES_NOT_IMPLEMENTED = ("yarn", "yarn_linear", "yarn_log", "theta_scale")
_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class Grok2Config:
    vocab_size: int = 131072
    emb_size: int = 8192  # hidden_size
    key_size: int = 128  # head_dim, read directly (nh * hd need not equal emb_size; SPEC 2.4)
    num_q_heads: int = 64
    num_kv_heads: int = 8  # GQA: query head j uses kv head j // 8
    num_layers: int = 64
    num_experts: int = 8  # num_local_experts
    num_selected_experts: int = 2  # top-2 softmax probabilities over all experts, no renorm
    expert_width: int = 16384  # moe_intermediate_size
    dense_width: int = 32768  # intermediate_size: the dense MLP beside the MoE (residual_moe)
    residual_moe: bool = True  # FFN = (MLP + MoE) / sqrt(2); else FFN = MoE (SPEC 2.5)
    rms_norm_eps: float = 1e-5
    embedding_multiplier_scale: float = 90.50966799187809  # sqrt(8192), on the bf16 embedding
    output_multiplier_scale: float = 0.5  # on the logits before the final cap (SPEC 2.6)
    attn_logit_softcap: float = 30.0  # c * tanh(s / c) on attention scores; 0 = off
    router_logit_softcap: float = 30.0  # on router logits; 0 = off (S1 hard-codes 30, SPEC 6)
    final_logit_softcap: float = 50.0  # on the logits, after the output multiplier; 0 = off
    attn_temperature_len: int = 1024  # scores * log2(n)/log2(L) for query position n > L; <= 0 off
    rope_theta: int = 208533496  # int()-ed as SGLang does; plain RoPE, neox (half-split) layout
    sequence_len: int = 131072  # the RoPE cache SGLang builds: 8192 * 16 positions
    checkpoint_dtype: str = "bfloat16"  # torch_dtype: what the files hold (checked by readers)

    def __post_init__(self) -> None:
        if not isinstance(self.dense_width, int) or self.dense_width < 0:
            raise ConfigError(f"dense_width={self.dense_width!r}: must be an integer >= 0")
        if self.residual_moe and self.dense_width == 0:
            raise ConfigError("residual_moe=True needs the dense MLP's width (intermediate_size)")
        if self.checkpoint_dtype not in _DTYPES:
            raise ConfigError(f"checkpoint_dtype={self.checkpoint_dtype!r}: one of {_DTYPES}")
        self.to_grok_config()  # every field shared with Grok-1 is checked there, once

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def attention_parameters(self) -> int:
        """q, k, v and o projections of one layer (no biases)."""
        q = self.num_q_heads * self.key_size
        kv = self.num_kv_heads * self.key_size
        return self.emb_size * (2 * q + 2 * kv)

    @property
    def expert_parameters(self) -> int:
        """One expert: w1 (gate), w3 (up), w2 (down)."""
        return 3 * self.emb_size * self.expert_width

    @property
    def dense_mlp_parameters(self) -> int:
        return 3 * self.emb_size * self.dense_width if self.residual_moe else 0

    @property
    def layer_parameters(self) -> int:
        router = self.emb_size * self.num_experts
        norms = 4 * self.emb_size
        return (self.attention_parameters + self.dense_mlp_parameters + router + norms
                + self.num_experts * self.expert_parameters)

    @property
    def num_parameters(self) -> int:
        """All weights: untied embedding and lm_head, layers, final norm."""
        return 2 * self.vocab_size * self.emb_size + self.num_layers * self.layer_parameters \
            + self.emb_size

    @property
    def active_parameters(self) -> int:
        """Weights a token touches: everything but the experts it is not routed to (embedding
        and head counted whole, as SPEC 1's 114.9 B does)."""
        unused = self.num_experts - self.num_selected_experts
        return self.num_parameters - self.num_layers * unused * self.expert_parameters

    def weight_bytes(self, bytes_per_parameter: float = 2.0) -> int:
        """Bytes of all weights at `bytes_per_parameter` (2: bf16 as released; 1: fp8/int8)."""
        return int(self.num_parameters * bytes_per_parameter)

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V of one token over all layers, bf16 by default."""
        return 2 * self.num_layers * self.num_kv_heads * self.key_size * bytes_per_element

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, fields: dict[str, Any], *, source: str = "config.json") -> Grok2Config:
        """Parse a published config.json's fields (SPEC 3); ConfigError names the field."""
        if not isinstance(fields, dict):
            raise ConfigError(f"{source}: expected a JSON object of config fields")
        try:
            return cls(**_parse(dict(fields), source))
        except ConfigError as e:
            if str(e).startswith(f"{source}:"):
                raise
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> Grok2Config:
        return cls.from_hf_dict(read_config_json(path), source=str(path))

    def replace(self, **changes: Any) -> Grok2Config:
        return dataclasses.replace(self, **changes)

    def to_grok_config(self) -> GrokConfig:
        """The GrokConfig model.py builds this model from: Grok-1's fields with Grok-2's values,
        SGLang's math switched on (grok2 SPEC 2): its caps, temperature, RoPE base, dense MLP,
        untied head, erf GELU, no pad-key masking and its bf16 rounding points."""
        return GrokConfig(
            vocab_size=self.vocab_size, pad_token=0, eos_token=2,  # <|eos|> = 2 (SPEC 5, S12)
            sequence_len=self.sequence_len, emb_size=self.emb_size, key_size=self.key_size,
            num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
            num_layers=self.num_layers, num_experts=self.num_experts,
            num_selected_experts=self.num_selected_experts,
            embedding_multiplier_scale=self.embedding_multiplier_scale,
            output_multiplier_scale=self.output_multiplier_scale,
            attn_output_multiplier=self.key_size ** -0.5,  # SGLang's scaling hd**-0.5 (SPEC 2.4)
            rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            attn_logit_softcap=self.attn_logit_softcap,
            router_logit_softcap=self.router_logit_softcap,
            final_logit_softcap=self.final_logit_softcap,
            attn_temperature_len=max(self.attn_temperature_len, 0),  # <= 0: off (SPEC 2.4)
            expert_width=self.expert_width,
            dense_width=self.dense_width if self.residual_moe else 0,
            tied_embeddings=False,  # lm_head.weight is its own tensor (SPEC 2.6)
            mask_pad_keys=False,  # SGLang masks causally only (SPEC 2.4 step 6)
            gelu="erf",  # SGLang's CUDA gelu_and_mul kernels (SPEC 2.5, S2/S6)
            rounding="sglang")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Fields:
    """Takes fields out of the config dict one by one, so that what is left is unknown."""

    def __init__(self, fields: dict[str, Any], source: str):
        self.fields, self.source = fields, source

    def error(self, name: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {name}={value!r}: {why}")

    def take(self, name: str, default: Any = ..., *, kind: str = "int",
             nullable: bool = False) -> Any:
        """The field's value (removed from what is left), checked to be of `kind`: int, float
        (any finite number), bool, str or list; None passes only if `nullable`."""
        if name not in self.fields:
            if default is ...:
                raise ConfigError(f"{self.source}: missing field {name}")
            return default
        value = self.fields.pop(name)
        if value is None and nullable:
            return None
        ok = {"int": lambda v: _is_number(v) and isinstance(v, int),
              "float": _is_number,
              "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str),
              "list": lambda v: isinstance(v, list)}[kind](value)
        if not ok:
            raise self.error(name, value, f"expected {'a number' if kind == 'float' else kind}")
        return value

    def expect(self, name: str, allowed: tuple, why: str) -> None:
        """A field that is accepted only at values that change nothing we compute."""
        if name in self.fields:
            value = self.fields.pop(name)
            if value not in allowed:
                raise self.error(name, value, why)


def _parse(raw: dict[str, Any], source: str) -> dict[str, Any]:
    f = _Fields(raw, source)
    arch = f.take("architectures", [ARCHITECTURE], kind="list")
    if ARCHITECTURE not in arch:
        raise f.error("architectures", arch, f"not a Grok-2 config (expected {ARCHITECTURE})")
    f.expect("model_type", ("git",), "Grok-2's config says 'git' (a transformers GitConfig, "
             "untied head); another model_type is another model")
    dtype = f.take("torch_dtype", "bfloat16", kind="str")
    if dtype not in _DTYPES:
        raise f.error("torch_dtype", dtype, f"one of {_DTYPES}")
    f.expect("tie_word_embeddings", (False,), "Grok-2's lm_head is its own tensor (SPEC 2.6); "
             "a tied head is not what SGLang runs")

    out: dict[str, Any] = {"checkpoint_dtype": dtype}
    out["vocab_size"] = f.take("vocab_size")
    out["emb_size"] = f.take("hidden_size")
    out["num_layers"] = f.take("num_hidden_layers")
    out["num_q_heads"] = f.take("num_attention_heads")
    out["num_kv_heads"] = f.take("num_key_value_heads")
    out["key_size"] = f.take("head_dim", 128)  # SGLang: getattr(config, "head_dim", 128)
    intermediate = f.take("intermediate_size")
    out["expert_width"] = f.take("moe_intermediate_size", intermediate)  # S1's fallback
    out["residual_moe"] = f.take("residual_moe", False, kind="bool")
    out["dense_width"] = intermediate if out["residual_moe"] else 0
    out["num_experts"] = f.take("num_local_experts")
    out["num_selected_experts"] = f.take("num_experts_per_tok")
    out["rms_norm_eps"] = f.take("rms_norm_eps", kind="float")
    out["embedding_multiplier_scale"] = f.take("embedding_multiplier_scale", kind="float")
    out["output_multiplier_scale"] = f.take("output_multiplier_scale", kind="float")

    # caps: SGLang clamps a negative attention cap to 0 (off) and reads None/0 as no final cap
    attn_cap = f.take("attn_logit_softcapping", 30.0, kind="float", nullable=True)
    out["attn_logit_softcap"] = max(float(attn_cap or 0.0), 0.0)
    out["router_logit_softcap"] = float(f.take("router_logit_softcapping", 30.0, kind="float"))
    if out["router_logit_softcap"] < 0:
        raise f.error("router_logit_softcapping", out["router_logit_softcap"], "must be >= 0")
    final_cap = f.take("final_logit_softcapping", None, kind="float", nullable=True)
    out["final_logit_softcap"] = max(float(final_cap or 0.0), 0.0)
    f.expect("attn_logit_softcapping_method", ("tanh",), "only the tanh cap is implemented")
    out["attn_temperature_len"] = f.take("attn_temperature_len", -1)

    # RoPE (SPEC 2.7): "original" is plain RoPE with base int(rope_theta); its YaRN-looking
    # parameters only size SGLang's cos/sin cache (original_max_position_embeddings *
    # scaling_factor) and are otherwise unused (mscale's use is commented out in S1).
    theta = f.take("rope_theta", kind="float")
    if theta < 2:
        raise f.error("rope_theta", theta, "must be a RoPE base >= 2")
    out["rope_theta"] = int(theta)
    rope_type = f.take("rope_type", None, kind="str", nullable=True)
    max_positions = f.take("max_position_embeddings")
    if rope_type in _ROPE_TYPES_NOT_IMPLEMENTED:
        raise f.error("rope_type", rope_type, "not implemented; Grok-2 uses 'original' (plain "
                      "RoPE, SPEC 2.7)")
    if rope_type not in (None, "original"):
        raise f.error("rope_type", rope_type, "unknown rope type; Grok-2 uses 'original'")
    original = f.take("original_max_position_embeddings", None, kind="int", nullable=True)
    factor = f.take("scaling_factor", None, kind="float", nullable=True)
    for inert in ("extrapolation_factor", "attn_factor", "beta_fast", "beta_slow"):
        f.take(inert, None, kind="float", nullable=True)  # YaRN's; unused by "original"
    if rope_type == "original" and original is not None and factor is not None:
        cache = int(original * factor)
        if cache <= 0:
            raise f.error("scaling_factor", factor, "the RoPE cache length must be positive")
        out["sequence_len"] = min(max_positions, cache)
    else:
        out["sequence_len"] = max_positions
    f.expect("rope_rotate_half_dims", (False,), "rotating half the head dims is not Grok-2's")

    # Attention pattern: SGLang's grok.py reads neither; the release values mean "global
    # attention in every layer", anything else would be a window SGLang does not apply.
    f.expect("sliding_window_size", (-1, None), "sliding-window attention is not implemented "
             "(SGLang ignores the field; Grok-2 has -1)")
    f.expect("global_attn_every_n", (1, None), "only global attention in every layer is "
             "implemented (Grok-2 has 1)")

    if f.fields:
        names = ", ".join(f"{k}={v!r}" for k, v in sorted(f.fields.items())[:10])
        raise ConfigError(f"{source}: unknown field(s) {names}; not part of Grok-2's config "
                          "(SPEC 3), refused rather than ignored")
    return out
