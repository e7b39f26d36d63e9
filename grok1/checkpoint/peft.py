"""LoRA adapters in PEFT's format: a folder with `adapter_config.json` (peft_type "LORA", r,
lora_alpha, lora_dropout, target_modules, base_model_name_or_path, ...) and
`adapter_model.safetensors`, tensors named as PEFT saves them:

    base_model.model.<module path>.lora_A.weight   [r, in]
    base_model.model.<module path>.lora_B.weight   [out, r]

Module paths are those of the hpcai-tech/grok-1 port (grok1.checkpoint.hf SCHEMES["hpcai"]):
`model.layers.{i}.attn.q_proj`, ..., `model.layers.{i}.moe_block.experts.{e}.linear` (w_gate),
`linear_v` (w_up), `linear_1` (w_down). Of the two HF ports it is the one whose modules are
torch Linears under the names PEFT users target (q_proj, k_proj, v_proj, o_proj) and whose
layout vLLM's and SGLang's Grok-1 loaders read, so an adapter saved here loads onto it with
PeftModel.from_pretrained. target_modules lists those leaf names ("linear" matches only the
experts' gate projection: PEFT matches a name or a `.name` suffix). grok1's [(E,) in, out]
matrices are torch's [out, in] transposed; LoRA's A [r, in] and B [out, r] are the same in both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from grok1.checkpoint.hf import SCHEMES
from grok1.checkpoint.names import CheckpointError, name_mismatch
from grok1.checkpoint.native import write_safetensors
from grok1.config import ConfigError, GrokConfig, read_config_json
from grok1.lora import (
    EXPERT_TARGETS,
    TARGETS,
    AdapterSelection,
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_modules,
)
from grok1.model import Grok1

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model: the HF model
SCHEME = SCHEMES["hpcai"]


def hf_module(target: str, layer: int, expert: int | None = None) -> str:
    """The hpcai-tech module path of grok1's `target` (TARGETS) in `layer` (and `expert`)."""
    table = SCHEME.expert if target in EXPERT_TARGETS else SCHEME.layer
    suffix = table[f"{target}.weight"].removesuffix(".weight")
    return SCHEME.layer_prefix.format(i=layer) + suffix.format(e=expert)


# grok1 target <-> PEFT target_modules entry (the module's leaf name)
TARGET_MODULES = {t: hf_module(t, 0, 0).rpartition(".")[2] for t in TARGETS}
_TARGET_OF = {leaf: t for t, leaf in TARGET_MODULES.items()}


def adapter_names(config: GrokConfig, targets: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """PEFT tensor name -> (grok1 module path, "lora_A"|"lora_B", expert index or none)."""
    names = {}
    for i in range(config.num_layers):
        for t in targets:
            for e in range(config.num_experts) if t in EXPERT_TARGETS else [None]:
                module = PREFIX + hf_module(t, i, e)
                for ab in ("lora_A", "lora_B"):
                    names[f"{module}.{ab}.weight"] = (f"layers.{i}.{t}", ab) + (
                        () if e is None else (e,))
    return names


def peft_config(config: LoraConfig, base_model_name_or_path: str) -> dict:
    """adapter_config.json's fields, as PEFT's LoraConfig writes them for this adapter."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r,
            "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": sorted(TARGET_MODULES[t] for t in config.targets),
            "base_model_name_or_path": base_model_name_or_path, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_adapter(model: Grok1, config: LoraConfig, out_dir: str | Path, *,
                 base_model_name_or_path: str = "", slot: int = 0,
                 overwrite: bool = False) -> Path:
    """Write adapter `slot` of `model`'s LoraLinears as a PEFT folder at `out_dir`, atomically
    (a temporary folder renamed). CheckpointError if it exists and not `overwrite`, or if the
    model's adapters are not `config`'s targets."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass overwrite=True to replace it")
    modules = dict(lora_modules(model))
    tensors = {}
    for name, (path, ab, *expert) in adapter_names(model.config, config.targets).items():
        if path not in modules:
            raise CheckpointError(f"{path} carries no adapter, but the config targets it")
        t = getattr(modules[path], ab)[slot]
        tensors[name] = (t[expert[0]] if expert else t).detach().contiguous()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        (tmp / ADAPTER_CONFIG).write_text(
            json.dumps(peft_config(config, base_model_name_or_path), indent=2) + "\n")
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_adapter_config(path: str | Path) -> LoraConfig:
    """The LoraConfig of a PEFT adapter folder; ConfigError naming the file and the field
    for anything grok1 does not compute (another peft_type, bias, DoRA, rsLoRA, per-module
    ranks, a regex target_modules, modules_to_save, a subset of layers)."""
    file = Path(path) / ADAPTER_CONFIG
    fields = read_config_json(file)
    if fields.get("peft_type") != "LORA":
        raise ConfigError(f"{file}: peft_type {fields.get('peft_type')!r}; grok1 reads LORA")
    unsupported = {"bias": "none", "use_dora": False, "use_rslora": False,
                   "fan_in_fan_out": False, "modules_to_save": None,
                   "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    for field, plain in unsupported.items():
        if fields.get(field, plain) not in (plain, [] if plain is None else plain):
            raise ConfigError(f"{file}: {field}={fields[field]!r} is not supported (grok1 "
                              f"reads {field}={plain!r})")
    modules = fields.get("target_modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"{file}: target_modules={modules!r}: expected a list of module "
                          f"names of {', '.join(sorted(_TARGET_OF))}")
    unknown = [m for m in modules if m not in _TARGET_OF]
    if unknown:
        raise ConfigError(f"{file}: target_modules {unknown} are not Grok-1 matrices; expected "
                          f"names of {', '.join(sorted(_TARGET_OF))}")
    try:
        return LoraConfig(r=fields.get("r"), alpha=fields.get("lora_alpha"),
                          dropout=fields.get("lora_dropout", 0.0),
                          targets=tuple(_TARGET_OF[m] for m in modules))
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def read_adapter(path: str | Path, model_config: GrokConfig
                 ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, {f"{grok1 module path}.lora_A" [(E,) r, in] / ".lora_B" [(E,) out, r]: f32})
    of the PEFT adapter folder `path` for a model of `model_config`. CheckpointError naming
    the file for missing or unexpected tensors, a wrong shape or a non-float tensor."""
    path = Path(path)
    config = read_adapter_config(path)
    file = path / ADAPTER_WEIGHTS
    where = f"{path.name}/{ADAPTER_WEIGHTS}"
    names = adapter_names(model_config, config.targets)
    c = model_config
    dims = {"attn.wq": (c.emb_size, c.num_q_heads * c.key_size),
            "attn.wk": (c.emb_size, c.num_kv_heads * c.key_size),
            "attn.wv": (c.emb_size, c.num_kv_heads * c.key_size),
            "attn.wo": (c.num_q_heads * c.key_size, c.emb_size),
            "moe.w_gate": (c.emb_size, c.ffn_size), "moe.w_up": (c.emb_size, c.ffn_size),
            "moe.w_down": (c.ffn_size, c.emb_size)}
    try:
        f = safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from e
    pieces: dict[str, dict[int | None, torch.Tensor]] = {}
    with f:
        keys = list(f.keys())
        if mismatch := name_mismatch(names, keys):
            raise CheckpointError(f"{where} does not match its {ADAPTER_CONFIG} for a model of "
                                  f"{c.num_layers} layers and {c.num_experts} experts: "
                                  + mismatch)
        for name, (module, ab, *expert) in names.items():
            t = f.get_tensor(name)
            d_in, d_out = dims[module.split(".", 2)[2]]
            want = (config.r, d_in) if ab == "lora_A" else (d_out, config.r)
            if tuple(t.shape) != want or not t.is_floating_point():
                raise CheckpointError(f"{where}: {name} is {t.dtype} {tuple(t.shape)}; expected "
                                      f"a float tensor of shape {want} (r={config.r})")
            pieces.setdefault(f"{module}.{ab}", {})[expert[0] if expert else None] = t.float()
    return config, {k: v[None] if None in v else torch.stack([v[e] for e in range(len(v))])
                    for k, v in pieces.items()}


def fill_adapter(model: Grok1, tensors: dict[str, torch.Tensor], config: LoraConfig,
                 slot: int = 0) -> None:
    """Copy read_adapter's tensors into adapter `slot` of `model`'s LoraLinears (a smaller rank
    fills the first r rows of A and columns of B; the rest stays zero and adds nothing)."""
    modules = dict(lora_modules(model))
    with torch.no_grad():
        for key, t in tensors.items():
            path, _, ab = key.rpartition(".")
            module: LoraLinear | None = modules.get(path)
            if module is None:
                raise ConfigError(f"{path} carries no adapter; apply_lora with the adapter's "
                                  f"targets ({', '.join(config.targets)})")
            target = getattr(module, ab)[slot]
            if ab == "lora_A":
                target[..., :config.r, :].copy_(t)
            else:
                target[..., :config.r].copy_(t)
            module.lora_scale[slot] = config.scale


def load_adapters(model: Grok1, folders: list[str | Path]) -> AdapterSelection:
    """Give `model` the PEFT adapters in `folders` as slots 1..n of stacked LoraLinears (the
    union of their targets at the largest rank; a matrix an adapter does not target stays
    zero in its slot and adds nothing), for serving them side by side (grok1.engine.Engine's
    `adapters`). Returns the model's AdapterSelection; errors as read_adapter's."""
    read = [read_adapter(folder, model.config) for folder in folders]
    if not read:
        raise ConfigError("load_adapters: no adapter folders given")
    targets = tuple(t for t in TARGETS if any(t in c.targets for c, _ in read))
    union = LoraConfig(r=max(c.r for c, _ in read), targets=targets)
    selection = apply_lora(model, union, num_adapters=len(read))
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_A.zero_()
    for slot, (config, tensors) in enumerate(read):
        fill_adapter(model, tensors, config, slot)
    return selection
