"""The Hugging Face ports of Grok-1 (hpcai-tech/grok-1, keyfan/grok-1-hf) read into grok1's names.

Reader API (the shape every format takes behind grok1.load):
    detect(path) -> bool          a folder of .safetensors or .bin shards in one of the schemes
    read(path, config, want=None, *, quantize=False) -> Iterator[(state-dict key, tensor)]
        every tensor of `want` (TensorSlices or names of a dense Grok1's state dict,
        grok1.checkpoint.slices; None = all, whole), in grok1's layout. All names and shapes
        are checked against `config` before any data is read. With `quantize`, each attention
        and expert matrix is quantized as the release stores it (grok1.quant: int8 `.weight`
        and bf16 `.scales`, QUANT_GROUPS) and yields both keys; other tensors as stored.
    to_hf(scheme, key, tensor) -> list[(HF name, tensor)]   the other direction (tests, convert)
    config_from_hf(fields, source) -> GrokConfig             a port's config.json, strictly

Both ports store the reference's bf16 weights as torch.nn.Linear [out, in] (grok1: [in, out])
with one tensor per expert; both RoPE layouts are the reference's rotate-half, so no row
permutation is needed. Names (facts from their modeling code and loaders, never their code):
- hpcai-tech/grok-1 (Grok1ModelForCausalLM; its modeling_grok1.py as copied into
  tenstorrent/tt-metal models/experimental/grok/reference/model.py, and vLLM's grok1.py loader):
  model.embed_tokens.weight, model.norm.scale, model.layers.{i}.attn.{q,k,v,o}_proj.weight,
  .moe_block.gate.weight, .moe_block.experts.{e}.{linear,linear_v,linear_1}.weight,
  .{pre,post}_attn_norm.scale, .{pre,post}_moe_norm.scale; lm_head.weight tied to the embedding.
- keyfan/grok-1-hf (the reference's haiku names with dots: distributed-llama's
  convert-grok-1.py and llama.cpp's Grok converter read these): transformer.in_out_embed.weight,
  transformer.rms_norm.weight, transformer.decoder_layer.{i}.multi_head_attention.{query,key,
  value,linear}.weight, .router.weight, .moe.{e}.{linear,linear_v,linear_1}.weight,
  .rms_norm{,_1,_2,_3}.weight; lm_head.weight in its first shard.
`linear` is the reference's GELU-gated projection (moe.w_gate), `linear_v` the up projection,
`linear_1` the down projection (names.py). A present lm_head.weight must equal the embedding:
Grok-1 ties them (the reference's in_out_embed), and a differing head is refused, not dropped.

`.bin` shards are read with torch.load(weights_only=True, mmap=True): tensors only, no code
runs (torch refuses any other global), and pages are read as tensors are sliced.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from grok1.checkpoint.names import CheckpointError, name_mismatch
from grok1.checkpoint.slices import TensorSlice, normalize_want
from grok1.config import ConfigError, GrokConfig
from grok1.model import RMS_EPS, ROPE_BASE, SOFTCAP
from grok1.quant import QUANT_GROUPS
from grok1.quant import quantize as quantize_int8

__all__ = ["SCHEMES", "config_from_hf", "detect", "grok1_shapes", "read", "scheme_of", "to_hf"]


class Scheme(NamedTuple):
    top: dict[str, str]  # grok1 key -> HF name (model-level; embed and final norm)
    layer_prefix: str  # HF prefix of layer i
    layer: dict[str, str]  # grok1 suffix below layers.{i}. -> HF suffix (matrices transposed)
    expert: dict[str, str]  # grok1 suffix -> HF suffix of expert {e}
    marker: str  # a name only this scheme has (layer 0's query projection)


SCHEMES: dict[str, Scheme] = {
    "hpcai": Scheme(
        top={"embed": "model.embed_tokens.weight", "norm.scale": "model.norm.scale"},
        layer_prefix="model.layers.{i}.",
        layer={"attn.wq.weight": "attn.q_proj.weight", "attn.wk.weight": "attn.k_proj.weight",
               "attn.wv.weight": "attn.v_proj.weight", "attn.wo.weight": "attn.o_proj.weight",
               "moe.router": "moe_block.gate.weight",
               "attn_norm.scale": "pre_attn_norm.scale",
               "attn_out_norm.scale": "post_attn_norm.scale",
               "moe_norm.scale": "pre_moe_norm.scale",
               "moe_out_norm.scale": "post_moe_norm.scale"},
        expert={"moe.w_gate.weight": "moe_block.experts.{e}.linear.weight",
                "moe.w_up.weight": "moe_block.experts.{e}.linear_v.weight",
                "moe.w_down.weight": "moe_block.experts.{e}.linear_1.weight"},
        marker="model.layers.0.attn.q_proj.weight"),
    "keyfan": Scheme(
        top={"embed": "transformer.in_out_embed.weight", "norm.scale": "transformer.rms_norm.weight"},
        layer_prefix="transformer.decoder_layer.{i}.",
        layer={"attn.wq.weight": "multi_head_attention.query.weight",
               "attn.wk.weight": "multi_head_attention.key.weight",
               "attn.wv.weight": "multi_head_attention.value.weight",
               "attn.wo.weight": "multi_head_attention.linear.weight",
               "moe.router": "router.weight",
               "attn_norm.scale": "rms_norm.weight", "attn_out_norm.scale": "rms_norm_1.weight",
               "moe_norm.scale": "rms_norm_2.weight", "moe_out_norm.scale": "rms_norm_3.weight"},
        expert={"moe.w_gate.weight": "moe.{e}.linear.weight",
                "moe.w_up.weight": "moe.{e}.linear_v.weight",
                "moe.w_down.weight": "moe.{e}.linear_1.weight"},
        marker="transformer.decoder_layer.0.multi_head_attention.query.weight"),
}
TIED_HEAD = "lm_head.weight"
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def grok1_shapes(config: GrokConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of a dense Grok1 (model.py), in its layout and order."""
    c = config
    D, E, F = c.emb_size, c.num_experts, c.ffn_size
    q, kv = c.num_q_heads * c.key_size, c.num_kv_heads * c.key_size
    layer = {"attn_norm.scale": (D,), "attn_out_norm.scale": (D,), "moe_norm.scale": (D,),
             "moe_out_norm.scale": (D,), "attn.wq.weight": (D, q), "attn.wk.weight": (D, kv),
             "attn.wv.weight": (D, kv), "attn.wo.weight": (q, D), "moe.router": (D, E),
             "moe.w_gate.weight": (E, D, F), "moe.w_up.weight": (E, D, F),
             "moe.w_down.weight": (E, F, D)}
    shapes = {"embed": (c.vocab_size, D)}
    for i in range(c.num_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    shapes["norm.scale"] = (D,)
    return shapes


def _hf_names(scheme: Scheme, key: str, num_experts: int) -> tuple[list[str], bool]:
    """(HF names behind a grok1 key: one, or one per expert; whether matrices are transposed)."""
    if key in scheme.top:
        return [scheme.top[key]], False
    m = _LAYER.fullmatch(key)
    prefix = scheme.layer_prefix.format(i=int(m.group(1)))
    suffix = m.group(2)
    if suffix in scheme.expert:
        return [prefix + scheme.expert[suffix].format(e=e) for e in range(num_experts)], True
    return [prefix + scheme.layer[suffix]], not suffix.endswith(".scale")


def to_hf(scheme: str, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors (name, [out, in] contiguous) behind one dense grok1 tensor."""
    s = SCHEMES[scheme]
    names, transposed = _hf_names(s, key, tensor.shape[0] if tensor.dim() == 3 else 0)
    if tensor.dim() == 3:
        return [(n, t.T.contiguous()) for n, t in zip(names, tensor, strict=True)]
    return [(names[0], tensor.T.contiguous() if transposed else tensor)]


# ---- the files -----------------------------------------------------------------------------

class _Shards:
    """Name -> file of every tensor in a folder of .safetensors (preferred) or .bin shards, with
    shapes and dtypes from the headers (safetensors) or the memory-mapped load (.bin)."""

    def __init__(self, folder: Path):
        self.folder = folder
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            raise CheckpointError(f"{folder}: no .safetensors or .bin weight files")
        self.files = files
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
        self._open: dict[Path, object] = {}
        for p in files:
            for name, shape, dtype in self._scan(p):
                if name in self.where:
                    raise CheckpointError(f"{folder.name}/{p.name}: {name} is also in "
                                          f"{self.where[name].name}")
                self.where[name], self.meta[name] = p, (shape, dtype)

    def _handle(self, p: Path):
        if p not in self._open:
            where = f"{self.folder.name}/{p.name}"
            if p.suffix == ".safetensors":
                try:
                    self._open[p] = safe_open(p, framework="pt")
                except SafetensorError as e:
                    raise CheckpointError(f"{where}: not a readable safetensors file ({e}); "
                                          "truncated? fetch it again") from None
            else:
                try:  # tensors only: weights_only refuses every other global, so no code runs
                    state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # torch raises several types for a bad or unsafe file
                    raise CheckpointError(f"{where}: not a loadable weights-only torch file "
                                          f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
                if not isinstance(state, dict) or not all(
                        isinstance(k, str) and isinstance(v, torch.Tensor)
                        for k, v in state.items()):
                    raise CheckpointError(f"{where}: expected a dict of named tensors")
                self._open[p] = state
        return self._open[p]

    def _scan(self, p: Path):
        h = self._handle(p)
        if isinstance(h, dict):
            return [(k, tuple(v.shape), v.dtype) for k, v in h.items()]
        return [(k, tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype())
                for k in h.keys()]  # noqa: SIM118 (safe_open is not iterable)

    def get(self, name: str, index: tuple) -> torch.Tensor:
        h = self._handle(self.where[name])
        if isinstance(h, dict):
            return h[name][index].clone()  # out of the file mapping
        return h.get_slice(name)[index]


def scheme_of(path: str | Path) -> str | None:
    """Which HF scheme the folder's tensor names follow (from its index file when there is one,
    else the shards' names), or None."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    names: Iterable[str] = ()
    for index in _INDEX_FILES:
        if (folder / index).is_file():
            try:
                names = json.loads((folder / index).read_text()).get("weight_map", {})
            except (json.JSONDecodeError, AttributeError):
                return None
            break
    else:
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            return None
        try:
            names = _Shards(folder).where
        except CheckpointError:
            return None
    return next((k for k, s in SCHEMES.items() if s.marker in names), None)


def detect(path: str | Path) -> bool:
    return scheme_of(path) is not None


def _check(shards: _Shards, scheme: Scheme, config: GrokConfig) -> None:
    """Every name present with the shape `config` implies; nothing unexpected. Raises
    CheckpointError naming file, tensor, expected and found."""
    expected: dict[str, tuple[int, ...]] = {}
    for key, shape in grok1_shapes(config).items():
        names, transposed = _hf_names(scheme, key, config.num_experts)
        per = shape[1:] if len(shape) == 3 else shape
        for n in names:
            expected[n] = tuple(reversed(per)) if transposed else per
    # a port may also store the tied head (lm_head.weight): optional, checked against the embedding
    if mismatch := name_mismatch(expected, (n for n in shards.where if n != TIED_HEAD)):
        raise CheckpointError(f"{shards.folder.name} does not hold the Grok-1 its config "
                              f"describes ({config.num_layers} layers): " + mismatch)
    if TIED_HEAD in shards.where:
        expected[TIED_HEAD] = (config.vocab_size, config.emb_size)
    for name, shape in expected.items():
        got, dtype = shards.meta[name]
        where = f"{shards.folder.name}/{shards.where[name].name} ({name})"
        if got != shape:
            raise CheckpointError(f"{where}: shape {shape} expected, file has {got}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32, "BF16", "F16", "F32"):
            raise CheckpointError(f"{where}: a float tensor expected, file has {dtype}")


# ---- reading ---------------------------------------------------------------------------------

def read(path: str | Path, config: GrokConfig, want: Iterable[TensorSlice | str] | None = None,
         *, quantize: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(grok1 state-dict key, CPU tensor) for each entry of `want`, in its order (see the module
    docstring). Raises CheckpointError for a folder in neither scheme, missing, unexpected or
    mis-shaped tensors, unreadable files, or an lm_head that differs from the embedding;
    ValueError for a `want` entry that is not a dense Grok1 tensor or out of its range."""
    folder = Path(path)
    shards = _Shards(folder)  # every file opened (a bad one is named) before the names are read
    name = next((k for k, s in SCHEMES.items() if s.marker in shards.where), None)
    if name is None:
        raise CheckpointError(f"{folder}: not a Hugging Face Grok-1 folder (no "
                              f"{' or '.join(s.marker for s in SCHEMES.values())})")
    scheme = SCHEMES[name]
    _check(shards, scheme, config)
    shapes = grok1_shapes(config)
    for s in normalize_want(want, shapes):
        suffix = _LAYER.fullmatch(s.name).group(2) if s.name.startswith("layers.") else s.name
        groups = QUANT_GROUPS.get(suffix.removesuffix(".weight")) if quantize else None
        bounds = s.bounds(shapes[s.name])
        if groups is None:
            t = _read(shards, scheme, s.name, shapes[s.name], bounds, config.num_experts)
            if s.name == "embed" and TIED_HEAD in shards.where:
                _check_tied(shards, scheme, t, bounds)
            yield s.name, t
            continue
        # Quantized: scales are per output column and input-dim group, so the input dim (K) is
        # read whole, quantized, then narrowed; expert and output-column slices commute.
        k_dim = len(shapes[s.name]) - 2
        read_bounds = None if bounds is not None and bounds[0] == k_dim else bounds
        w, scales = quantize_int8(
            _read(shards, scheme, s.name, shapes[s.name], read_bounds, config.num_experts), groups)
        if read_bounds is None and bounds is not None:
            w, scales = _narrow_input_dim(w, scales, bounds, s.name)
        yield s.name, w
        yield s.name.removesuffix(".weight") + ".scales", scales


def _read(shards: _Shards, scheme: Scheme, key: str, shape: tuple[int, ...],
          bounds: tuple[int, int, int] | None, num_experts: int) -> torch.Tensor:
    """One grok1 tensor (or its slice along one dim) from the HF tensors, [in, out] layout."""
    names, transposed = _hf_names(scheme, key, num_experts)
    dim, start, stop = bounds if bounds is not None else (None, 0, 0)
    if len(shape) == 3:  # experts [E, in, out] from E files [out, in]: grok1 dim d = file 2 - d
        experts = range(start, stop) if dim == 0 else range(shape[0])
        index = [slice(None), slice(None)]
        if dim in (1, 2):
            index[2 - dim] = slice(start, stop)
        return torch.stack([shards.get(names[e], tuple(index)).T for e in experts]).contiguous()
    index = [slice(None)] * len(shape)
    if dim is not None:
        index[len(shape) - 1 - dim if transposed else dim] = slice(start, stop)
    t = shards.get(names[0], tuple(index))
    return (t.T if transposed else t).contiguous()


def _check_tied(shards: _Shards, scheme: Scheme, embed: torch.Tensor,
                bounds: tuple[int, int, int] | None) -> None:
    index = [slice(None), slice(None)]
    if bounds is not None:
        index[bounds[0]] = slice(bounds[1], bounds[2])
    head = shards.get(TIED_HEAD, tuple(index))
    if not torch.equal(head.to(embed.dtype), embed):
        raise CheckpointError(f"{shards.folder.name}/{shards.where[TIED_HEAD].name} ({TIED_HEAD}):"
                              f" differs from the embedding {scheme.top['embed']}; Grok-1 ties its "
                              "output head to the embedding, so this is not Grok-1's head")


def _narrow_input_dim(w: torch.Tensor, scales: torch.Tensor, bounds: tuple[int, int, int],
                      name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start:stop of the input dim of a quantized [(E,) K, N] matrix, with the scale
    groups they use: whole groups, or one group's scale when the range lies inside it."""
    dim, start, stop = bounds
    K, G = w.shape[dim], scales.shape[-2]
    size = K // G
    if G == 1:
        pass
    elif start % size == 0 and stop % size == 0:
        scales = scales.narrow(-2, start // size, (stop - start) // size)
    elif start // size == (stop - 1) // size:
        scales = scales.narrow(-2, start // size, 1)
    else:
        raise ValueError(f"{name}: input rows {start}:{stop} split scale groups of {size} rows")
    return w.narrow(dim, start, stop - start).contiguous(), scales.contiguous()


# ---- config.json ---------------------------------------------------------------------------

# Fields of the ports' transformers configs that describe the HF runtime, not the model's math
# (hpcai-tech's, as copied into tt-metal's reference/config.json). hidden_act is among them: the
# ports run erf GELU where the reference (and grok1) computes the tanh approximation.
_RUNTIME_FIELDS = frozenset({"architectures", "auto_map", "model_type", "torch_dtype",
                             "transformers_version", "use_cache", "output_router_logits",
                             "router_aux_loss_coef", "initializer_range", "hidden_act",
                             "bos_token_id"})
# Fields whose value model.py fixes: accepted only at that value.
_FIXED = {"max_attn_value": SOFTCAP, "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_BASE,
          "tie_word_embeddings": True}


def config_from_hf(fields: dict, source: str = "config.json") -> GrokConfig:
    """The GrokConfig of a port's config.json. Every field is mapped, checked against the value
    model.py fixes (attention cap 30, RMS eps 1e-5, RoPE base 10000, tied head), accepted as
    HF-runtime only (_RUNTIME_FIELDS), or refused: ConfigError names the field and value."""
    f = dict(fields)

    def take(name: str, default=...):
        if name not in f:
            if default is ...:
                raise ConfigError(f"{source}: missing field {name}")
            return default
        return f.pop(name)

    D, heads = take("hidden_size"), take("num_attention_heads")
    F = take("intermediate_size")
    experts = take("num_experts", None)
    local = take("num_local_experts", None)
    if experts is not None and local is not None and experts != local:
        raise ConfigError(f"{source}: num_experts={experts} and num_local_experts={local} differ")
    out = {"vocab_size": take("vocab_size"), "emb_size": D, "num_q_heads": heads,
           "num_kv_heads": take("num_key_value_heads"), "num_layers": take("num_hidden_layers"),
           "num_experts": experts if experts is not None else local,
           "num_selected_experts": take("num_experts_per_tok"),
           "sequence_len": take("max_position_embeddings"),
           "embedding_multiplier_scale": take("embedding_multiplier_scale"),
           "output_multiplier_scale": take("output_multiplier_scale"),
           "attn_output_multiplier": take("attn_output_multiplier"),
           "pad_token": take("pad_token_id", 0), "eos_token": take("eos_token_id", 2)}
    if out["num_experts"] is None:
        raise ConfigError(f"{source}: missing field num_experts (or num_local_experts)")
    if not isinstance(D, int) or not isinstance(heads, int) or heads <= 0 or D % heads:
        raise ConfigError(f"{source}: hidden_size={D!r} is not a multiple of "
                          f"num_attention_heads={heads!r}")
    out["key_size"] = D // heads  # the ports' head size (no head_dim field)
    head_dim = take("head_dim", out["key_size"])
    if head_dim != out["key_size"]:
        raise ConfigError(f"{source}: head_dim={head_dim!r}; the ports use hidden_size / "
                          f"num_attention_heads = {out['key_size']}")
    for name, fixed in _FIXED.items():
        if name in f and not (f[name] == fixed or (isinstance(fixed, float) and isinstance(
                f[name], (int, float)) and math.isclose(f[name], fixed, rel_tol=1e-9))):
            raise ConfigError(f"{source}: {name}={f[name]!r}; grok1 computes Grok-1 with "
                              f"{name}={fixed!r} (model.py)")
        f.pop(name, None)
    for name in _RUNTIME_FIELDS:
        f.pop(name, None)
    if f:
        names = ", ".join(f"{k}={v!r}" for k, v in sorted(f.items())[:10])
        raise ConfigError(f"{source}: unknown field(s) {names}; refused rather than ignored")
    # the expert width as the reference's widening rule gives it: F = 8 * D * 2/3 for Grok-1
    out["widening_factor"] = 3 * F / (2 * D) if isinstance(F, int) and D else F
    try:
        config = GrokConfig(**out)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if config.ffn_size != F:
        raise ConfigError(f"{source}: intermediate_size={F!r} is not an expert width the "
                          f"reference's rule gives (nearest: {config.ffn_size})")
    return config
