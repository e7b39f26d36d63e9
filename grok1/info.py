"""The arithmetic behind `grok1 info`: parameters, weight bytes, KV bytes, GPUs needed (SPEC 9),
for Grok-1 and, from its Grok2Config, Grok-2 (its dense MLP and untied head counted; grok2 SPEC 1)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from grok1.config import GrokConfig, read_config_json
from grok1.config_grok2 import ARCHITECTURE, Grok2Config

GROK2_PRESET = "grok-2"  # the published config.json's values (Grok2Config's defaults)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    total_params: int
    non_embedding_params: int  # without the input table (and an untied head)
    active_params: int  # per token: attention, the selected experts, router, norms, embedding once
    bytes_bf16: int  # every tensor in bf16
    bytes_released: int  # int8 matrices + bf16 scales, the rest f32 (the release checkpoint)
    bytes_int8: int  # int8 matrices + bf16 scales, the rest bf16 (grok1 in memory)
    bytes_int4: int  # int4 matrices (groups of 128 inputs) + bf16 scales, the rest bf16
    bytes_fp8: int  # fp8 e4m3 matrices + a bf16 scale per output column, the rest bf16
    kv_bytes_per_token: int  # bf16 K and V of every layer

    def gpus_needed(self, gpu_bytes: int, weight_bytes: int | None = None,
                    headroom: float = 0.9) -> int:
        """Fewest GPUs whose memory (times `headroom`, for activations and cache) holds the weights."""
        return math.ceil((self.bytes_int8 if weight_bytes is None else weight_bytes)
                         / (gpu_bytes * headroom))


def model_size(c: GrokConfig) -> ModelSize:
    """Counts of `c`'s model as model.py builds it: the attention and expert matrices are those
    a weight format quantizes; the embedding (and an untied head), Grok-2's dense MLP, routers
    and norms stay dense. `bytes_released` is Grok-1's release format (int8, the rest f32)."""
    D, H, Fw, E = c.emb_size, c.key_size, c.ffn_size, c.num_experts
    attn = D * c.num_q_heads * H * 2 + D * c.num_kv_heads * H * 2  # q, o; k, v
    expert = 3 * D * Fw
    dense = 3 * D * c.dense_width  # Grok-2's dense MLP beside the MoE (0 for Grok-1)
    router, norms = D * E, 4 * D
    embed = c.vocab_size * D * (1 if c.tied_embeddings else 2)  # the input table (+ lm_head)
    layer = attn + dense + E * expert + router + norms
    total = c.num_layers * layer + embed + D
    active = c.num_layers * (attn + dense + c.num_selected_experts * expert + router + norms) \
        + embed + D
    quantized = c.num_layers * (attn + E * expert)
    # scale elements per layer: one bf16 row per output column and input-dim group (SPEC 3)
    scales = c.num_layers * (c.num_q_heads * H + 2 * c.num_kv_heads * H + 8 * D
                             + E * (2 * Fw + 8 * D))
    unquantized = total - quantized
    return ModelSize(
        total_params=total,
        non_embedding_params=total - embed,
        active_params=active,
        bytes_bf16=2 * total,
        bytes_released=quantized + 2 * scales + 4 * unquantized,
        bytes_int8=quantized + 2 * scales + 2 * unquantized,
        bytes_int4=weight_bytes(c, "int4"),
        bytes_fp8=weight_bytes(c, "fp8"),
        kv_bytes_per_token=c.num_layers * 2 * c.num_kv_heads * H * 2,
    )


def weight_bytes(c: GrokConfig, weights: str | None, group_size: int = 128) -> int:
    """Bytes of every weight with the attention and expert matrices stored as `weights` ("int8",
    "int4" in groups of `group_size` inputs, "fp8"; None: bf16; grok1.quant's formats, each
    with bf16 scales) and the other tensors in bf16. Torch-free, so `grok1 info` stays quick."""
    D, H, Fw, E = c.emb_size, c.key_size, c.ffn_size, c.num_experts
    # (experts, input dim, output dim, the release's int8 scale groups: SPEC 3)
    matrices = ((1, D, c.num_q_heads * H, 1), (1, D, c.num_kv_heads * H, 1),
                (1, D, c.num_kv_heads * H, 1), (1, c.num_q_heads * H, D, 8),
                (E, D, Fw, 1), (E, D, Fw, 1), (E, Fw, D, 8))
    per_layer = 0
    for experts, d_in, d_out, int8_groups in matrices:
        n = experts * d_in * d_out
        if weights is None:
            per_layer += 2 * n
        elif weights == "int8":
            per_layer += n + 2 * experts * int8_groups * d_out
        elif weights == "int4":
            per_layer += n // 2 + 2 * experts * -(-d_in // group_size) * d_out
        elif weights == "fp8":
            per_layer += n + 2 * experts * d_out
        else:
            raise ValueError(f"weights={weights!r}: expected one of int8, int4, fp8 or None")
    tables = c.vocab_size * D * (1 if c.tied_embeddings else 2)
    unquantized = tables + D + c.num_layers * (D * E + 4 * D + 3 * D * c.dense_width)
    return c.num_layers * per_layer + 2 * unquantized


def tensor_parallel_sizes(c: GrokConfig) -> list[int]:
    """The --tp sizes grok1 can shard `c` over with the default --moe tp --unembed vocab: those
    the attention splits over that also divide the expert width, the vocabulary and the dense
    MLP's width (grok1.sharding)."""
    return [r for r in c.attention_tp_sizes if c.ffn_size % r == 0 and c.vocab_size % r == 0
            and c.dense_width % r == 0]


def info_config(spec: str | Path) -> GrokConfig | Grok2Config:
    """The config `grok1 info` describes: a JSON file (Grok-2's config.json, recognised by its
    `architectures`, or the reference's field names), the "grok-2" preset (Grok-2's published
    values), or another preset name. Raises ConfigError naming a bad file, preset or field."""
    if isinstance(spec, Path) or str(spec).endswith(".json"):
        if "architectures" in read_config_json(spec):  # the HF layout Grok-2 ships
            return Grok2Config.from_json(spec)
        return GrokConfig.from_json(spec)
    return Grok2Config() if spec == GROK2_PRESET else GrokConfig.preset(spec)


def format_info(config: GrokConfig | Grok2Config, gpu_gib: float = 80.0) -> str:
    grok2 = isinstance(config, Grok2Config)
    c = config.to_grok_config() if grok2 else config
    s = model_size(c)
    gb = lambda n: f"{n:,} B ({n / 1e9:.2f} GB, {n / 2**30:.1f} GiB)"
    gpu_bytes = int(gpu_gib * 2**30)
    dense = f", a dense MLP of width {c.dense_width} beside them" if c.dense_width else ""
    twice = ("" if not c.tied_embeddings else
             f" ({s.active_params + c.vocab_size * c.emb_size:,} counting the tied embedding twice)")
    lines = [
        (f"{'Grok-2: ' if grok2 else ''}layers {c.num_layers}, d_model {c.emb_size}, heads "
         f"{c.num_q_heads} q / {c.num_kv_heads} kv of {c.key_size}, experts {c.num_experts} (top "
         f"{c.num_selected_experts}) of width {c.ffn_size}{dense}, vocab {c.vocab_size}"
         f"{'' if c.tied_embeddings else ' (untied head)'}, context {c.sequence_len}"),
        f"parameters, total:          {s.total_params:,}",
        f"parameters, non-embedding:  {s.non_embedding_params:,}",
        f"parameters, active/token:   {s.active_params:,}{twice}",
        f"weights, bf16:              {gb(s.bytes_bf16)}",
        (f"weights, as released:       {gb(s.bytes_bf16)} (bf16)" if grok2 else
         f"weights, as released:       {gb(s.bytes_released)}"),
        f"weights, int8 (in memory):  {gb(s.bytes_int8)}",
        f"weights, int4 (groups 128): {gb(s.bytes_int4)}",
        f"weights, fp8:               {gb(s.bytes_fp8)}",
        (f"KV cache per token:         {s.kv_bytes_per_token:,} B; per {c.sequence_len}-token "
         f"sequence {s.kv_bytes_per_token * c.sequence_len / 2**30:.2f} GiB"),
    ]
    tp_sizes = tensor_parallel_sizes(c)
    lines.append(f"tensor-parallel sizes (--tp): {', '.join(map(str, tp_sizes))} (each divides "
                 f"the {c.num_kv_heads} KV heads or is a multiple of {c.num_kv_heads} dividing the "
                 f"{c.num_q_heads} query heads, and splits the expert width"
                 f"{', the dense MLP' if c.dense_width else ''} and vocabulary evenly)")
    if c.dense_width:
        lines.append("(int8/int4/fp8: the attention and expert matrices; the dense MLP, "
                     "embedding and head stay bf16)")
    for name, n in (("int8", s.bytes_int8), ("int4", s.bytes_int4), ("fp8", s.bytes_fp8),
                    ("bf16", s.bytes_bf16)):
        needed = s.gpus_needed(gpu_bytes, n)
        tp = next((r for r in tp_sizes if r >= needed), None)
        lines.append(f"fewest {gpu_gib:g} GiB GPUs for {name} weights (90 % of memory): {needed}, "
                     + (f"so --tp {tp}" if tp else f"more than --tp can split ({tp_sizes[-1]})"))
    return "\n".join(lines)
