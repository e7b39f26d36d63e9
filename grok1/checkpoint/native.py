"""grok1's own checkpoint folder, for trained and converted models.

Format (version 1), a folder holding:
- `config.json`: the GrokConfig fields, reference names (`GrokConfig.save_json`).
- `model.safetensors`: the model's state dict under model.py's names (`embed`, `norm.scale`,
  `layers.{i}.attn.wq.weight`, ...), every matrix stored [(E,) in, out] as the model holds it.
  Quantized: the attention and expert matrices are int8 `.weight` with bf16 `.scales`
  [(E,) G, out] (G = 1, or 8 for attn.wo and moe.w_down; see grok1.quant); dense: bf16 (or f32)
  `.weight` only. Norms and routers are f32, the embedding bf16 (or f32). Header metadata:
  `{"format": "pt", "grok1_format": "1", "quantized": "true"|"false"}`; loading decides
  quantized from the keys (`.scales` present), not from the metadata.
- `tokenizer.model` (optional): the SentencePiece model the weights go with.

Saving streams tensor by tensor (never a second copy of the model) into a temporary sibling
folder that is renamed into place once complete, so a crash never leaves a half-written folder
under the final name. Loading checks every name, shape and integer dtype before reading data,
then takes tensor by tensor onto the device. On the CPU, tensors already in the model's dtype
stay memory-mapped from the file (copy-on-write, by safetensors): loading is quick and the page
cache is shared, and the file must not be truncated in place while the model lives (save_native
never does: it replaces the folder by renaming).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from grok1.checkpoint.names import CheckpointError, ShardFn, assign_tensor, name_mismatch
from grok1.config import GrokConfig
from grok1.model import Grok1

FORMAT_VERSION = "1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8",
              torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def safetensors_header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str]) -> bytes:
    """A safetensors file's first bytes (length + JSON header, padded so the data starts
    8-byte aligned, as safetensors writes it) for tensors (key, dtype, shape) in this order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in specs:
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{key}: dtype {dtype} cannot be saved in safetensors")
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr()))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time (safetensors' own writer first copies
    every tensor to host bytes, which would double a 300 GB model in RAM); fsync'ed."""
    for key, t in tensors.items():
        if t.is_meta:
            raise CheckpointError(f"{key} is on the meta device (never loaded); nothing to save")
    header = safetensors_header([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                                metadata)
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors.values():
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())


def save_native(model: Grok1, out_dir: str | Path, tokenizer_path: str | Path | None = None, *,
                overwrite: bool = False) -> Path:
    """Write `model` (and a copy of its tokenizer) as a grok1 folder at `out_dir`, atomically.

    Raises CheckpointError if `out_dir` exists and `overwrite` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        model.config.save_json(tmp / CONFIG_FILE)
        quantized = any(k.endswith(".scales") for k in model.state_dict())
        write_safetensors(tmp / WEIGHTS_FILE, model.state_dict(),
                          {"format": "pt", "grok1_format": FORMAT_VERSION,
                           "quantized": str(quantized).lower()})
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        if out_dir.exists():  # overwrite: move the old folder aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old",
                                        dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def native_config(path: str | Path) -> GrokConfig:
    """The config.json of the grok1 folder `path`; CheckpointError when it has none."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} beside {WEIGHTS_FILE}")
    return GrokConfig.from_json(path / CONFIG_FILE)


def _whole_model(config: GrokConfig, quantized: bool, dtype: torch.dtype) -> Grok1:
    with torch.device("meta"):
        return Grok1(config, quantized=quantized, dtype=dtype)


def load_native(path: str | Path, config: GrokConfig | None = None, *,
                device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                build: Callable[[GrokConfig, bool, torch.dtype], Grok1] | None = None,
                shard_fn: ShardFn | None = None) -> Grok1:
    """The Grok1 saved in the grok1 folder `path` (config from its config.json unless given).

    Quantized or dense as saved; `dtype` is the dtype of the embedding and dense matrices
    (default: as saved). For one rank of several (grok1.load with a mesh), `build(config,
    quantized, dtype)` makes the meta model of the rank's shapes and `shard_fn(key, tensor)`
    cuts the rank's piece from each memory-mapped tensor, as for the release
    (xai_pickle.load_xai_checkpoint); the pieces are copied out of the file.
    Raises CheckpointError for missing or unexpected names, wrong shapes or int8/scale dtypes,
    ConfigError for a bad config.json.
    """
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}; not a grok1 checkpoint folder")
    config = config or native_config(path)
    where = f"{path.name}/{WEIGHTS_FILE}"
    device = torch.device(device)
    try:  # a rank's pieces are cut on the CPU (memory-mapped), then moved
        f = safe_open(weights, framework="pt", device="cpu" if shard_fn else str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from e
    with f:
        keys = list(f.keys())
        quantized = any(k.endswith(".scales") for k in keys)
        if dtype is None:
            dtype = _TORCH_DTYPES.get(f.get_slice("embed").get_dtype(), torch.bfloat16) \
                if "embed" in keys else torch.bfloat16
        whole = _whole_model(config, quantized, dtype)  # the file's shapes
        targets = dict(whole.state_dict(keep_vars=True))
        if mismatch := name_mismatch(targets, keys):
            raise CheckpointError(f"{where} does not match its config ({config.num_layers} layers"
                                  f", {'quantized' if quantized else 'dense'}): " + mismatch)
        for key, target in targets.items():
            s = f.get_slice(key)
            shape, file_dtype = tuple(s.get_shape()), _TORCH_DTYPES.get(s.get_dtype())
            if shape != tuple(target.shape):
                raise CheckpointError(f"{where}: {key} shape {tuple(target.shape)} expected, "
                                      f"file has {shape}")
            exact = target.dtype in (torch.int8,) or key.endswith(".scales")
            if file_dtype is None or (exact and file_dtype != target.dtype) or (
                    not exact and not file_dtype.is_floating_point):
                raise CheckpointError(f"{where}: {key} dtype {target.dtype} expected, file has "
                                      f"{s.get_dtype()}")
        model = whole if build is None else build(config, quantized, dtype)
        local = dict(model.state_dict(keep_vars=True))
        for key, target in local.items():
            t = f.get_tensor(key)
            if shard_fn is not None:
                t = shard_fn(key, t)
                if tuple(t.shape) != tuple(target.shape):
                    raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)} after "
                                          f"shard_fn, the model expects {tuple(target.shape)}")
            moved = t.to(device=device, dtype=target.dtype)
            if shard_fn is not None and moved.data_ptr() == t.data_ptr():
                moved = moved.clone()  # a rank's piece owns its memory, not the file's map
            assign_tensor(model, key, moved)
    return model
