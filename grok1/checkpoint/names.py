"""The one name table: grok1 parameter names <-> the xAI release's names and file order.

grok1 names are model.py's: a quantized matrix is named by its module (`layers.3.attn.wq`, whose
state-dict keys are `.weight` and `.scales`); the other parameters by their state-dict key
(`embed`, `norm.scale`, `layers.3.attn_norm.scale`, `layers.3.moe.router`).

The release checkpoint stores one parameter per file, `ckpt-0/tensor{i:05d}_000`, where i is the
leaf's index in jax.tree_util flatten order of the haiku params (SPEC section 4). Flattening sorts
dict keys as strings, so the two `language_model/...` leaves come first, then the layers in
lexicographic order of their names (0, 1, 10, 11, ..., 19, 2, 20, ...), each layer's 12 leaves in
sorted order of their reference names: file = 2 + 12 * rank(str(i)) + j.

Also here, shared by every format's loader: CheckpointError and `assign_tensor`, which puts a
loaded tensor under its state-dict key into a model built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

# Per-layer leaves in the reference's sorted order j = 0..11 (SPEC section 4 table):
# (reference name below transformer/decoder_layer_{i}/, grok1 name below layers.{i}.)
LAYER_NAMES: tuple[tuple[str, str], ...] = (
    ("moe/linear/w", "moe.w_gate"),  # gets the GELU
    ("moe/linear_1/w", "moe.w_down"),
    ("moe/linear_v/w", "moe.w_up"),
    ("multi_head_attention/key/w", "attn.wk"),
    ("multi_head_attention/linear/w", "attn.wo"),
    ("multi_head_attention/query/w", "attn.wq"),
    ("multi_head_attention/value/w", "attn.wv"),
    ("rms_norm/scale", "attn_norm.scale"),
    ("rms_norm_1/scale", "attn_out_norm.scale"),
    ("rms_norm_2/scale", "moe_norm.scale"),
    ("rms_norm_3/scale", "moe_out_norm.scale"),
    ("router/w", "moe.router"),
)
# Model-level leaves, files 0 and 1 ("language_model" sorts before "transformer").
TOP_NAMES: tuple[tuple[str, str], ...] = (
    ("language_model/in_out_embed/embeddings", "embed"),  # f32 in the file, tied in/out
    ("language_model/rms_norm/scale", "norm.scale"),  # final norm
)
LAYER_PREFIX_XAI = "transformer/decoder_layer_{i}/"
LAYER_PREFIX = "layers.{i}."
# grok1 names (below layers.{i}.) of the int8 matrices; the others are f32 in the release.
QUANTIZED_NAMES = frozenset({"attn.wq", "attn.wk", "attn.wv", "attn.wo",
                             "moe.w_gate", "moe.w_up", "moe.w_down"})

_FROM_XAI = dict(LAYER_NAMES)
_TO_XAI = {ours: ref for ref, ours in LAYER_NAMES}
_TOP_FROM_XAI = dict(TOP_NAMES)
_TOP_TO_XAI = {ours: ref for ref, ours in TOP_NAMES}
_XAI_LAYER = re.compile(r"transformer/decoder_layer_(\d+)/(.+)")
_GROK1_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


# shard_fn(state-dict key, the tensor as stored) -> this rank's piece (a view is fine): how a
# reader loads one rank's slices (grok1.loading builds it from the parallel plan)
ShardFn = Callable[[str, torch.Tensor], torch.Tensor]


class CheckpointError(Exception):
    """A checkpoint that does not hold the model its config describes (the message says where)."""


class XaiEntry(NamedTuple):
    file_index: int
    xai_name: str
    grok1_name: str


def xai_file_name(file_index: int) -> str:
    """`tensor00013_000`: leaf index, then host index 000 (the release has a single host)."""
    return f"tensor{file_index:05d}_000"


def xai_num_files(num_layers: int) -> int:
    return len(TOP_NAMES) + len(LAYER_NAMES) * num_layers


def xai_parameter_order(num_layers: int) -> list[XaiEntry]:
    """Every file of a release checkpoint with `num_layers` layers, in file order."""
    entries = [XaiEntry(k, ref, ours) for k, (ref, ours) in enumerate(TOP_NAMES)]
    for rank, i in enumerate(sorted(range(num_layers), key=str)):  # "10" < "2", as jax sorts
        base = len(TOP_NAMES) + len(LAYER_NAMES) * rank
        for j, (ref, ours) in enumerate(LAYER_NAMES):
            entries.append(XaiEntry(base + j, LAYER_PREFIX_XAI.format(i=i) + ref,
                                    LAYER_PREFIX.format(i=i) + ours))
    return entries


def from_xai_name(xai_name: str) -> str:
    """`transformer/decoder_layer_3/multi_head_attention/query/w` -> `layers.3.attn.wq`."""
    return _translate(xai_name, _TOP_FROM_XAI, _XAI_LAYER, _FROM_XAI, LAYER_PREFIX,
                      "a Grok-1 reference parameter name")


def to_xai_name(grok1_name: str) -> str:
    """`layers.3.attn.wq` -> `transformer/decoder_layer_3/multi_head_attention/query/w`."""
    return _translate(grok1_name, _TOP_TO_XAI, _GROK1_LAYER, _TO_XAI, LAYER_PREFIX_XAI,
                      "a grok1 parameter name")


def _translate(name: str, top: dict[str, str], layer_re: re.Pattern, layer_names: dict[str, str],
               prefix_out: str, what: str) -> str:
    """One direction of the name table: model-level names by `top`, per-layer ones by their
    layer index and `layer_names`, re-prefixed with `prefix_out`."""
    if name in top:
        return top[name]
    m = layer_re.fullmatch(name)
    if m is None or m.group(2) not in layer_names:
        raise KeyError(f"{name!r} is not {what}")
    return prefix_out.format(i=int(m.group(1))) + layer_names[m.group(2)]


def is_quantized_name(grok1_name: str) -> bool:
    """Whether the release stores this parameter as int8 weight + bf16 scales."""
    m = _GROK1_LAYER.fullmatch(grok1_name)
    return m is not None and m.group(2) in QUANTIZED_NAMES


def state_keys(grok1_name: str, quantized: bool) -> tuple[str, ...]:
    """The state-dict keys behind a parameter name: `.weight` (+ `.scales`) for matrices."""
    m = _GROK1_LAYER.fullmatch(grok1_name)
    if m is None or m.group(2) not in QUANTIZED_NAMES:
        return (grok1_name,)
    weight = f"{grok1_name}.weight"
    return (weight, f"{grok1_name}.scales") if quantized else (weight,)


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the parameter or buffer named `key` (a state-dict key) of `model`, without
    copying it: how loaders fill a model built on the meta device. Parameters come out frozen."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(getattr(module, attr), nn.Parameter):
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(module, attr, tensor)


def name_mismatch(expected: Iterable[str], present: Iterable[str]) -> str:
    """"N missing: a, b, ...; M unexpected: ..." (the first 10 of each, in their collections'
    order) for an error naming what a checkpoint's `present` tensors lack of the model's
    `expected` ones or hold beyond them; "" when they match."""
    expected, present = list(expected), list(present)
    expected_set, present_set = set(expected), set(present)
    missing = [k for k in expected if k not in present_set]
    unexpected = [k for k in present if k not in expected_set]

    def first(names: list[str]) -> str:
        return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")

    parts = ([f"{len(missing)} missing: {first(missing)}"] if missing else []) + \
        ([f"{len(unexpected)} unexpected: {first(unexpected)}"] if unexpected else [])
    return "; ".join(parts)
