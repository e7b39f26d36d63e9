"""The arithmetic behind `grok1 info`: parameters, weight bytes, KV bytes, GPUs needed (SPEC 9),
for Grok-1 and, from its Grok2Config, Grok-2 (its dense MLP and untied head counted; grok2 SPEC 1)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from grok1.config import GrokConfig, read_config_json
from grok1.config_grok2 import Grok2Config

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
    unquantized = total - c.num_layers * (attn + E * expert)
    int8 = weight_bytes(c, "int8")
    return ModelSize(
        total_params=total,
        non_embedding_params=total - embed,
        active_params=active,
        bytes_bf16=weight_bytes(c, None),
        bytes_released=int8 + 2 * unquantized,  # the unquantized tensors in f32, not bf16
        bytes_int8=int8,
        bytes_int4=weight_bytes(c, "int4"),
        bytes_fp8=weight_bytes(c, "fp8"),
        kv_bytes_per_token=c.num_layers * 2 * c.num_kv_heads * H * 2,
    )


def quantizable_matrices(c: GrokConfig) -> dict[str, tuple[int, int, int, int]]:
    """The seven matrices a weight format quantizes (and LoRA can target), per layer: (copies
    (experts), input dim, output dim, the release's int8 scale groups along the input; SPEC 3)."""
    D, q, kv = c.emb_size, c.num_q_heads * c.key_size, c.num_kv_heads * c.key_size
    E, Fw = c.num_experts, c.ffn_size
    return {"attn.wq": (1, D, q, 1), "attn.wk": (1, D, kv, 1), "attn.wv": (1, D, kv, 1),
            "attn.wo": (1, q, D, 8), "moe.w_gate": (E, D, Fw, 1), "moe.w_up": (E, D, Fw, 1),
            "moe.w_down": (E, Fw, D, 8)}


def weight_bytes(c: GrokConfig, weights: str | None, group_size: int = 128) -> int:
    """Bytes of every weight with the attention and expert matrices stored as `weights` ("int8",
    "int4" in groups of `group_size` inputs, "fp8"; None: bf16; grok1.quant's formats, each
    with bf16 scales) and the other tensors in bf16. Torch-free, so `grok1 info` stays quick."""
    D, E = c.emb_size, c.num_experts
    per_layer = 0
    for experts, d_in, d_out, int8_groups in quantizable_matrices(c).values():
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


def format_info(config: GrokConfig | Grok2Config, gpu_gib: float = 80.0,
                weights: str | None = None, group_size: int = 128) -> str:
    """`grok1 info`'s text: sizes, and the fewest GPUs of `gpu_gib` for each weight format, or
    for `weights` alone ("int8", "int4" in groups of `group_size`, "fp8", "bf16")."""
    grok2 = isinstance(config, Grok2Config)
    c = config.to_grok_config() if grok2 else config
    s = model_size(c)

    def gb(n: int) -> str:
        return f"{n:,} B ({n / 1e9:.2f} GB, {n / 2**30:.1f} GiB)"
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
    formats = [("int8", s.bytes_int8), ("int4", s.bytes_int4), ("fp8", s.bytes_fp8),
               ("bf16", s.bytes_bf16)]
    if weights is not None:
        if weights not in dict(formats):
            raise ValueError(f"weights={weights!r}: expected one of int8, int4, fp8, bf16")
        n = weight_bytes(c, None if weights == "bf16" else weights, group_size)
        label = f"int4 (groups {group_size})" if weights == "int4" else weights
        lines.append(f"weights, {label}: {gb(n)}")
        formats = [(label, n)]
    for name, n in formats:
        needed = s.gpus_needed(gpu_bytes, n)
        tp = next((r for r in tp_sizes if r >= needed), None)
        lines.append(f"fewest {gpu_gib:g} GiB GPUs for {name} weights (90 % of memory): {needed}, "
                     + (f"so --tp {tp}" if tp else f"more than --tp can split ({tp_sizes[-1]})"))
    return "\n".join(lines)


# ---- LoRA fine-tuning (`grok1 finetune`): what one process holds -------------------------------

LORA_TARGET_DIMS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "moe.w_gate", "moe.w_up",
                    "moe.w_down")  # grok1.lora.TARGETS (kept torch-free here)


def lora_matrix_dims(c: GrokConfig) -> dict[str, tuple[int, int, int]]:
    """(copies per layer, input dim, output dim) of each matrix LoRA can target."""
    return {name: dims[:3] for name, dims in quantizable_matrices(c).items()}


@dataclasses.dataclass(frozen=True)
class LoraMemoryPlan:
    """Bytes one process holds at the peak of a LoRA step over the frozen int8 base (the plain
    model's path on a GPU: bf16 compute, f32 where the reference computes in f32; fused AdamW;
    per-layer activation checkpointing), counted from what grok1.model and grok1.lora keep.
    The peak is one layer's backward, or the loss's when the vocabulary outweighs a layer."""
    weight_bytes: int  # the base as grok1.load holds it: int8 + bf16 scales, embedding bf16,
    #                    norms and routers f32
    adapter_params: int
    adapter_bytes: int  # f32 A and B
    grad_bytes: int  # f32, one per adapter parameter
    optimizer_bytes: int  # AdamW's two f32 moments per adapter parameter
    tokens: int  # micro_batch * seq_len
    kept_bytes_per_token: int  # through the whole backward: each layer's bf16 input (the
    #                            checkpoints), RoPE's f32 cos/sin, the mask, the gradient of h
    layer_bytes: int  # one layer recomputed in backward: its matrices dequantized, kept for the
    #                   input gradient (the attention's and the experts' gate/up bf16, the
    #                   down-projection's f32: its product is f32), every expert assumed hit
    #                   (all but two of the down-projection's without its adapter: see below)
    layer_bytes_per_token: int  # and its activations saved for backward
    #                             (f32 scores and probabilities, f32 GELU, adapters' f32 inputs)
    transient_bytes_per_token: int  # live at that layer's peak: the f32 gradients of the
    #                                 experts' [pairs, F] activations being summed
    loss_bytes_per_token: int  # the loss's peak instead: its f32 log-softmax, its gradient and
    #                            its input's

    @property
    def static_bytes(self) -> int:
        return self.weight_bytes + self.adapter_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def layer_peak_bytes(self) -> int:
        return self.layer_bytes + self.tokens * (self.layer_bytes_per_token
                                                 + self.transient_bytes_per_token)

    @property
    def total_bytes(self) -> int:
        return (self.static_bytes + self.tokens * self.kept_bytes_per_token
                + max(self.layer_peak_bytes, self.tokens * self.loss_bytes_per_token))

    def breakdown_gib(self) -> dict[str, float]:
        """Each term in GiB (bench/lora_finetune.py records it beside the measured peak)."""
        terms = {"weights": self.weight_bytes, "adapters": self.adapter_bytes,
                 "grads": self.grad_bytes, "adamw": self.optimizer_bytes,
                 "kept": self.tokens * self.kept_bytes_per_token,
                 "layer_dequantized": self.layer_bytes,
                 "layer_activations": self.tokens * self.layer_bytes_per_token,
                 "layer_transients": self.tokens * self.transient_bytes_per_token,
                 "loss": self.tokens * self.loss_bytes_per_token, "total": self.total_bytes}
        return {k: v / 2**30 for k, v in terms.items()}


def lora_memory_plan(c: GrokConfig, r: int, targets: tuple[str, ...] = LORA_TARGET_DIMS[:4], *,
                     seq_len: int = 4096, micro_batch: int = 1) -> LoraMemoryPlan:
    """The memory of `grok1 finetune` with rank-r adapters on `targets` (LORA_TARGET_DIMS).
    Checked against the live tensors of a CPU step with the GPU's dtypes
    (tests/train/test_lora_memory.py) and a GPU's peak (bench/lora_finetune.py)."""
    dims = lora_matrix_dims(c)
    unknown = [t for t in targets if t not in dims]
    if unknown or r <= 0:
        raise ValueError(f"LoRA rank {r}, targets {list(targets)}: need r > 0 and targets of "
                         f"{', '.join(dims)}")
    L, D, V, E = c.num_layers, c.emb_size, c.vocab_size, c.num_experts
    N, K, H, S, Fw = c.num_q_heads, c.num_kv_heads, c.key_size, seq_len, c.ffn_size
    A = c.num_selected_experts
    hit = set(targets).__contains__
    params = L * sum(copies * r * (d_in + d_out)
                     for t, (copies, d_in, d_out) in dims.items() if t in targets)
    f32_extra = 2 * (L * (4 * D + D * E) + D)  # norms and routers are f32, not bf16
    # dequantized bf16; the down-projection's f32 (moe_ref's f32 product takes it at f32).
    # Without its adapter, the experts' gradients peak as the second expert's is added to the
    # first's, after their down-projections' backward let those two matrices go.
    down_kept = E if hit("moe.w_down") else max(E - 2, 0)
    dequantized = sum(copies * d_in * d_out * 2 for t, (copies, d_in, d_out) in dims.items()
                      if t != "moe.w_down") + down_kept * Fw * D * 4
    attention = (4 * N * S + 4 * N * S + 2 * N * S + S  # f32 capped scores, probabilities;
                 #                                        bf16 probabilities; the mask
                 + 2 * N * H + 4 * K * H  # the bf16 q, k, v copies the two einsums keep
                 + 4 * D * sum(map(hit, ("attn.wq", "attn.wk", "attn.wv")))  # adapters' f32 x
                 + (4 * N * H if hit("attn.wo") else 0))
    norms_router = 4 * 4 * D + 4 * D + 4 * E + 8 * A  # the norms' f32 x; the router's; ids
    per_pair = (4 * 3 * Fw  # f32 gate, GELU(gate), up
                + (4 * Fw if hit("moe.w_down") else 0)  # their product: its adapter's input
                + 4 * D * (hit("moe.w_gate") + hit("moe.w_up"))  # adapters' f32 inputs
                + 4 * D)  # the f32 gated output
    return LoraMemoryPlan(
        weight_bytes=weight_bytes(c, "int8") + f32_extra,
        adapter_params=params, adapter_bytes=4 * params, grad_bytes=4 * params,
        optimizer_bytes=8 * params, tokens=seq_len * micro_batch,
        kept_bytes_per_token=L * 2 * D + 8 * H + S + 2 * D,
        layer_bytes=dequantized,
        layer_bytes_per_token=attention + norms_router + A * per_pair,
        transient_bytes_per_token=A * 3 * 4 * Fw,
        loss_bytes_per_token=3 * 4 * V)


def format_lora_plan(c: GrokConfig, r: int, targets: tuple[str, ...], seq_len: int,
                     micro_batch: int, gpu_gib: float = 80.0) -> str:
    p = lora_memory_plan(c, r, targets, seq_len=seq_len, micro_batch=micro_batch)
    gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
    lines = [
        f"LoRA rank {r} on {', '.join(targets)}: {p.adapter_params:,} adapter parameters",
        f"  base weights (int8 + scales, frozen): {gib(p.weight_bytes)}",
        f"  adapters (f32):                       {gib(p.adapter_bytes)}",
        f"  gradients (f32):                      {gib(p.grad_bytes)}",
        f"  AdamW state (2 x f32):                {gib(p.optimizer_bytes)}",
        (f"  kept through backward, per token:    {p.kept_bytes_per_token:,} B "
         f"(x {p.tokens:,} tokens = {gib(p.tokens * p.kept_bytes_per_token)})"),
        (f"  one layer in backward:                {gib(p.layer_bytes)} dequantized + "
         f"{p.layer_bytes_per_token + p.transient_bytes_per_token:,} B per token "
         f"= {gib(p.layer_peak_bytes)}"),
        (f"  the loss (if larger):                 {p.loss_bytes_per_token:,} B per token "
         f"= {gib(p.tokens * p.loss_bytes_per_token)}"),
        (f"  total, one process:                   {gib(p.total_bytes)} "
         f"(micro-batch {micro_batch} x {seq_len} tokens; "
         f"{p.total_bytes / (gpu_gib * 2**30):.1f} x {gpu_gib:g} GiB)"),
    ]
    return "\n".join(lines)
