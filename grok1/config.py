"""GrokConfig: the reference's LanguageModelConfig/TransformerConfig fields (SPEC section 1).

Field names are the reference's own, so a config.json written for xai-org/grok-1 (or the golden
model's) loads unchanged. Derived sizes are properties. The config is frozen: parallel code keeps
its local counts in its own objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or value that does not describe a valid Grok model."""


GELUS = ("tanh", "erf")
ROUNDINGS = ("jax", "sglang")
# The fields Grok-2 added; a Grok-1 config.json may omit them (their defaults are Grok-1's).
GROK2_FIELDS = ("rope_theta", "rms_norm_eps", "attn_logit_softcap", "router_logit_softcap",
                "final_logit_softcap", "attn_temperature_len", "expert_width", "dense_width",
                "tied_embeddings", "mask_pad_keys", "gelu", "rounding")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_numbers(config: Any, names: tuple[str, ...], *, caps: bool) -> None:
    """Each field a finite number, > 0 (or, for soft caps, >= 0 with 0 = no cap); ConfigError
    naming the field and value otherwise."""
    for name in names:
        value = getattr(config, name)
        if caps and (not _is_number(value) or value < 0):
            raise ConfigError(f"{name}={value!r}: must be a number >= 0 (0 = no cap)")
        if not caps and (not _is_number(value) or not value > 0):
            raise ConfigError(f"{name}={value!r}: must be a positive number")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The fields of a config.json (any model's); ConfigError naming the file when it is
    missing, not JSON, or not an object."""
    path = Path(path)
    try:
        fields = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields")
    return fields


@dataclasses.dataclass(frozen=True)
class GrokConfig:
    vocab_size: int = 128 * 1024  # SentencePiece BPE vocabulary, tied input/output table
    pad_token: int = 0  # tokens > pad_token are real; id 0 is masked as a key (SPEC 2.2)
    eos_token: int = 2  # the reference never stops on it; our generators do
    sequence_len: int = 8192  # KV-cache length in the reference; our context limit
    emb_size: int = 48 * 128  # d_model
    key_size: int = 128  # head size of q, k and v
    num_q_heads: int = 48
    num_kv_heads: int = 8  # GQA: 6 query heads share a kv head
    num_layers: int = 64
    widening_factor: float = 8.0  # expert width = int(8 * 6144) * 2 // 3 = 32768, rounded up to 8
    num_experts: int = 8
    num_selected_experts: int = 2  # top-2 softmax gates, not renormalised (SPEC 2.6)
    embedding_multiplier_scale: float = 78.38367176906169  # sqrt(6144); 78.5 once rounded to bf16
    output_multiplier_scale: float = 0.5773502691896257  # 1/sqrt(3); 0.578125 in bf16
    attn_output_multiplier: float = 0.08838834764831845  # 1/sqrt(key_size), applied in f32
    # Grok-2 (../shared/grok2/SPEC.md; names after its config.json). The defaults are Grok-1's
    # values, so every Grok-1 config and checkpoint means what it meant; `grok2_features()`
    # lists the fields a config sets away from them.
    rope_theta: float = 10000.0  # RoPE base; Grok-2: int(208533496) (grok2 SPEC 2.7)
    rms_norm_eps: float = 1e-5  # every norm
    attn_logit_softcap: float = 30.0  # c * tanh(s / c) on attention scores; 0 = off
    router_logit_softcap: float = 0.0  # on router logits before the softmax; 0 = off (Grok-2: 30)
    final_logit_softcap: float = 0.0  # on the logits after the output multiplier (Grok-2: 50)
    attn_temperature_len: int = 0  # L: scores * log2(n)/log2(L) for query position n > L; 0 = off
    expert_width: int | None = None  # None: the widening_factor rule (ffn_size); Grok-2: 16384
    dense_width: int = 0  # the dense MLP beside the MoE, FFN = (MLP + MoE) / sqrt(2); 0 = none
    tied_embeddings: bool = True  # the output projection is the input table; Grok-2: lm_head
    mask_pad_keys: bool = True  # pad tokens are masked as keys (SPEC 2.2); SGLang masks none
    gelu: str = "tanh"  # "tanh" (jax.nn.gelu's default) or "erf" (SGLang's CUDA kernels)
    # Whose bf16 rounding points: "jax" (xai-org/grok-1, SPEC 2.8: bf16-rounded multiplier
    # constants and router gates, f32 expert activations) or "sglang" (grok2 SPEC 2: unrounded
    # multipliers and gates, the expert activation and each expert's output stored bf16)
    rounding: str = "jax"

    def __post_init__(self) -> None:
        positive = ("vocab_size", "sequence_len", "emb_size", "key_size", "num_q_heads",
                    "num_kv_heads", "num_layers", "num_experts", "num_selected_experts")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(f"num_q_heads={self.num_q_heads} must be a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.num_selected_experts > self.num_experts:
            raise ConfigError(f"num_selected_experts={self.num_selected_experts} exceeds "
                              f"num_experts={self.num_experts}")
        if self.key_size % 2:
            raise ConfigError(f"key_size={self.key_size}: RoPE needs an even head size")
        if not 0 <= self.pad_token < self.vocab_size or not 0 <= self.eos_token < self.vocab_size:
            raise ConfigError(f"pad_token={self.pad_token} and eos_token={self.eos_token} must be "
                              f"ids below vocab_size={self.vocab_size}")
        for name in ("widening_factor", "embedding_multiplier_scale", "output_multiplier_scale",
                     "attn_output_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name}={value!r}: must be a positive number")
        require_numbers(self, ("rope_theta", "rms_norm_eps"), caps=False)
        require_numbers(self, ("attn_logit_softcap", "router_logit_softcap",
                               "final_logit_softcap"), caps=True)
        for name, value in (("attn_temperature_len", self.attn_temperature_len),
                            ("dense_width", self.dense_width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 0 (0 = off)")
        if self.expert_width is not None and (not isinstance(self.expert_width, int) or isinstance(
                self.expert_width, bool) or self.expert_width <= 0):
            raise ConfigError(f"expert_width={self.expert_width!r}: must be a positive integer "
                              "or None (the widening_factor rule)")
        for name in ("tied_embeddings", "mask_pad_keys"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be true or false")
        if self.gelu not in GELUS:
            raise ConfigError(f"gelu={self.gelu!r}: expected one of {', '.join(GELUS)}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding={self.rounding!r}: expected one of {', '.join(ROUNDINGS)}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        """Expert width F: `expert_width`, else the reference's ffn_size rule (SPEC section 1)."""
        if self.expert_width is not None:
            return self.expert_width
        f = int(self.widening_factor * self.emb_size) * 2 // 3
        return f + (8 - f) % 8

    @property
    def residual_moe(self) -> bool:
        """Whether a dense MLP runs beside the MoE (Grok-2's residual_moe, grok2 SPEC 2.5)."""
        return self.dense_width > 0

    def grok2_features(self) -> list[str]:
        """`field=value` for each Grok-2 field set away from Grok-1's value (empty for Grok-1):
        what a context computing Grok-1's math only (the engine's kernels) must refuse."""
        return [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if f.name in GROK2_FIELDS and getattr(self, f.name) != f.default]

    @property
    def q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def attention_tp_sizes(self) -> list[int]:
        """Tensor-parallel sizes the attention splits over evenly: each rank holds whole kv heads
        (sizes dividing num_kv_heads) or a share of one kv head's query heads (multiples of
        num_kv_heads dividing num_q_heads)."""
        K = self.num_kv_heads
        return [r for r in range(1, self.num_q_heads + 1)
                if self.num_q_heads % r == 0 and (K % r == 0 or r % K == 0)]

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> GrokConfig:
        """A named config: grok-1 (run.py), tiny (tests), debug (a few layers at small width),
        train-1b (training benchmarks)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_dict(cls, fields: dict[str, Any], *, source: str = "config",
                  ignore: tuple[str, ...] = ()) -> GrokConfig:
        """Strict: every field must be known and present, except Grok-2's (GROK2_FIELDS), which
        default to Grok-1's values (names in `ignore` are skipped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in fields.items() if k not in ignore}
        unknown = sorted(set(given) - known)
        missing = sorted(known - set(given) - set(GROK2_FIELDS))  # Grok-2's: Grok-1 defaults
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; "
                              f"known fields: {', '.join(sorted(known))}")
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**given)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> GrokConfig:
        """Load a JSON file with the reference's field names (extra `seed`/`parameter_order`
        keys of golden/config.json are descriptions of the file, not of the model)."""
        path = Path(path)
        return cls.from_dict(read_config_json(path), source=str(path),
                             ignore=("seed", "parameter_order"))

    @classmethod
    def resolve(cls, spec: GrokConfig | str | Path, overrides: Sequence[str] = ()) -> GrokConfig:
        """The config `spec` names: a GrokConfig as is, a JSON file (a Path, or a string ending
        in .json), else a preset name; then `field=value` overrides (ints, floats).

        The one reading of a `--config` option. Raises ConfigError naming a bad preset, file,
        override or value.
        """
        if isinstance(spec, GrokConfig):
            config = spec
        elif isinstance(spec, Path) or spec.endswith(".json"):
            config = cls.from_json(spec)
        else:
            config = cls.preset(str(spec))
        changes: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for item in overrides:
            key, _, value = item.partition("=")
            if key not in known or not value:
                raise ConfigError(f"override {item!r}: expected field=value with a field of "
                                  f"{', '.join(sorted(known))}")
            try:
                changes[key] = float(value) if "." in value or "e" in value else int(value)
            except ValueError:
                raise ConfigError(f"override {item!r}: {value!r} is not a number") from None
        if not changes:
            return config
        try:
            return config.replace(**changes)
        except ConfigError as e:
            raise ConfigError(f"{spec} with {', '.join(overrides)}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def replace(self, **changes: Any) -> GrokConfig:
        return dataclasses.replace(self, **changes)


def _small(emb_size: int, key_size: int, num_q_heads: int, num_kv_heads: int, num_layers: int,
           vocab_size: int, sequence_len: int) -> GrokConfig:
    """A config with Grok's ratios and multipliers at a smaller width."""
    return GrokConfig(vocab_size=vocab_size, sequence_len=sequence_len, emb_size=emb_size,
                      key_size=key_size, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                      num_layers=num_layers, embedding_multiplier_scale=math.sqrt(emb_size),
                      attn_output_multiplier=1 / math.sqrt(key_size))


PRESETS: dict[str, GrokConfig] = {
    "grok-1": GrokConfig(),
    # Tests: 6:1 GQA, 8 experts top-2, widths in the tens.
    "tiny": _small(emb_size=48, key_size=8, num_q_heads=6, num_kv_heads=1, num_layers=2,
                   vocab_size=256, sequence_len=128),
    # Full Grok ratios (48 q / 8 kv heads, 8-way scale groups line up) at a debuggable width.
    "debug": _small(emb_size=384, key_size=8, num_q_heads=48, num_kv_heads=8, num_layers=2,
                    vocab_size=1024, sequence_len=256),
    # Training benchmarks (bench/train_throughput.py): 1.02B parameters (0.34B active), Grok's
    # 6:1 GQA with 128-wide heads, 8 experts top-2 of width 2048, matmuls of tensor-core sizes.
    "train-1b": _small(emb_size=1536, key_size=128, num_q_heads=12, num_kv_heads=2,
                       num_layers=12, vocab_size=32768, sequence_len=2048
                       ).replace(widening_factor=2.0),
}
