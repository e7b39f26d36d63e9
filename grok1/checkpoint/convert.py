"""Streaming conversion into grok1's sharded format, with bounded memory, checksums and resume.

`convert(src, dst, weights)` reads the release's ckpt-0 (or a grok1 folder: one
`model.safetensors`, or sharded as below) one tensor at a time, expert by expert, and writes
the Hugging Face sharded convention: `model-00001-of-000NN.safetensors` ...,
`model.safetensors.index.json` (`weight_map`: key -> file; `metadata`: `total_size`, the grok1
fields `grok1_format`, `weights`, `group_size`, and every file's `sha256`) and `config.json`,
under model.py's state-dict names (as grok1.checkpoint.native). The attention and expert
matrices are requantized from their bf16 dequantization (the release's bf16(w * s), the
reference) into int4 or fp8 (grok1.quant), or copied as they are for int8 from int8; the
embedding is stored bf16 (exact: the reference casts it to bf16 before use), norms and
routers f32.

Memory: the source is memory-mapped, and each output tensor is produced and written one expert
(and, for int4, one block of columns) at a time into a shard whose header is written first
(every shape is known from the config): about 1 GB of working memory for Grok-1 (int4: one
expert's bf16 matrix, 0.4 GB, plus the scale search's f32 blocks), whatever the model's size.

Resume: the shards are written into `.DST.partial/` beside `dst`, each as `NAME.partial`
renamed when complete and recorded with its sha256 in `convert-state.json`; a later run with
the same settings keeps every recorded shard whose checksum still matches, redoes the rest,
and renames the folder to `dst` when all are done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from grok1.checkpoint import grok2
from grok1.checkpoint.names import (
    CheckpointError,
    assign_tensor,
    is_quantized_name,
    name_mismatch,
    state_keys,
    xai_file_name,
    xai_parameter_order,
)
from grok1.checkpoint.native import (
    _TORCH_DTYPES,
    CONFIG_FILE,
    FORMAT_VERSION,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    safetensors_header,
    tensor_bytes,
)
from grok1.checkpoint.slices import TensorSlice
from grok1.checkpoint.xai_pickle import resolve_ckpt0, scan_xai_checkpoint
from grok1.checkpoint.xai_pickle_reader import ArrayRef, QuantRef, map_array
from grok1.config import ConfigError, GrokConfig
from grok1.config_grok2 import Grok2Config
from grok1.model import Grok1
from grok1.quant import (
    INT4_GROUP_SIZE,
    QUANT_GROUPS,
    WeightFormat,
    dequantize_as,
    quantize_as,
    weight_format,
)
from grok1.tokenizer_grok2 import TOKENIZER_FILE as GROK2_TOKENIZER_FILE

INDEX_FILE = "model.safetensors.index.json"
STATE_FILE = "convert-state.json"
DEFAULT_SHARD_BYTES = 2 << 30
_CHUNK_BYTES = 256 << 20  # rows of a plain tensor (the embedding) converted at once

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]  # (state-dict key, dtype, shape)


# ---- the format's description in the index -------------------------------------------------------

def format_metadata(fmt: WeightFormat | None) -> dict[str, str]:
    """The grok1 fields of a shard's header and of the index's metadata."""
    return {"format": "pt", "grok1_format": FORMAT_VERSION,
            "weights": fmt.name if fmt else "bf16",
            "group_size": str(fmt.group_size) if fmt and fmt.group_size else ""}


def metadata_format(meta: dict[str, object], where: str) -> WeightFormat | None:
    """The WeightFormat that format_metadata described; CheckpointError naming `where`."""
    name = meta.get("weights")
    if name == "bf16":
        return None
    try:
        group = int(meta.get("group_size") or INT4_GROUP_SIZE)
        return weight_format(str(name), group)
    except ValueError as e:
        raise CheckpointError(f"{where}: metadata weights={name!r} group_size="
                              f"{meta.get('group_size')!r} is not a grok1 weight format ({e})"
                              ) from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(64 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- sources: what a parameter's stored tensors are ----------------------------------------------

@dataclasses.dataclass
class _Stored:
    """One parameter as the source stores it: a matrix's weight (+ scales, of format `fmt`;
    None: dense) or a plain tensor (`scales` None, `fmt` None), CPU tensors or lazy slices."""
    weight: object
    scales: object | None
    fmt: WeightFormat | None


def _part(t: object, index: int | slice) -> torch.Tensor:
    """t[index] as a CPU tensor: `t` a memory-mapped tensor or a safetensors slice, either of
    which reads only the part asked for."""
    return t[index]


def _shape(t: object) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


class _ReleaseSource:
    """The release's ckpt-0: every file scanned and checked first (a corrupt, truncated or
    unsafe file is refused before anything is written), then memory-mapped one at a time."""

    def __init__(self, path: Path, config: GrokConfig):
        self.ckpt0 = resolve_ckpt0(path)
        self.refs = {e.grok1_name: (e, ref) for e, ref in scan_xai_checkpoint(self.ckpt0, config)}
        self.order = [e.grok1_name for e in xai_parameter_order(config.num_layers)]

    def stored(self, name: str) -> _Stored:
        entry, ref = self.refs[name]
        path = self.ckpt0 / xai_file_name(entry.file_index)
        if isinstance(ref, QuantRef):
            return _Stored(map_array(path, ref.weight), map_array(path, ref.scales),
                           weight_format("int8"))
        assert isinstance(ref, ArrayRef)
        return _Stored(map_array(path, ref), None, None)

    def close(self) -> None:
        pass


class _SafetensorsSource:
    """A grok1 folder: `model.safetensors`, or the sharded files of an index (each checked
    against the index's sha256 first)."""

    def __init__(self, path: Path, config: GrokConfig):
        self.order = [e.grok1_name for e in xai_parameter_order(config.num_layers)]
        if (path / INDEX_FILE).is_file():
            index = read_index(path)
            self.fmt = metadata_format(index["metadata"], f"{path.name}/{INDEX_FILE}")
            verify_shards(path, index)
            files = {key: path / name for key, name in index["weight_map"].items()}
        else:
            files = {}
            self.fmt = None
        self.handles: dict[Path, object] = {}
        if not files:
            weights = path / WEIGHTS_FILE
            f = self._open(weights)
            files = dict.fromkeys(f.keys(), weights)
            meta = f.metadata() or {}
            self.fmt = weight_format("int8") if meta.get("quantized") == "true" else None
        self.files = files

    def _open(self, file: Path):
        if file not in self.handles:
            try:
                self.handles[file] = safe_open(file, framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file.parent.name}/{file.name}: not a readable "
                                      f"safetensors file ({e})") from e
        return self.handles[file]

    def _slice(self, key: str):
        if key not in self.files:
            raise CheckpointError(f"source has no tensor {key}")
        return self._open(self.files[key]).get_slice(key)

    def stored(self, name: str) -> _Stored:
        keys = state_keys(name, quantized=True)
        if len(keys) == 1:
            return _Stored(self._slice(name), None, None)
        weight = self._slice(keys[0])
        fmt = self.fmt if keys[1] in self.files else None
        return _Stored(weight, self._slice(keys[1]) if fmt else None, fmt)

    def close(self) -> None:
        self.handles.clear()


class _Grok2Source:
    """A Grok-2 release folder (grok1.checkpoint.grok2): every file checked first, then each
    tensor read a slice at a time (an expert, or a block of rows), bf16 as stored, in grok1's
    layout; the attention and expert matrices are those a weight format quantizes."""

    def __init__(self, path: Path, config: Grok2Config):
        self.reader = grok2.Reader(path, config)
        self.order = [key.removesuffix(".weight") if is_quantized_name(
            key.removesuffix(".weight")) else key for key in self.reader.shapes]

    def stored(self, name: str) -> _Stored:
        key = f"{name}.weight" if is_quantized_name(name) else name
        return _Stored(_Grok2Tensor(self.reader, key), None, None)

    def close(self) -> None:
        pass


class _Grok2Tensor:
    """One tensor of a Grok-2 folder, read on indexing along dim 0 (as _part indexes), with a
    safetensors slice's get_shape (as _shape asks)."""

    def __init__(self, reader: grok2.Reader, key: str):
        self.reader, self.key = reader, key
        self.full = reader.shapes[key]

    def get_shape(self) -> tuple[int, ...]:
        return self.full

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        if isinstance(index, int):
            return self[index:index + 1][0]
        start, stop, _ = index.indices(self.full[0])
        if (start, stop) == (0, self.full[0]):
            return self.reader.slice(TensorSlice(self.key))
        return self.reader.slice(TensorSlice(self.key, 0, start, stop))


FAMILIES = ("grok-1", "grok-2")  # the model a converted folder holds: its tokenizer's kind


def _open_source(src: Path, config: GrokConfig | Grok2Config | str | Path | None):
    """(source, the GrokConfig of the model, its family) for the folder `src`; `config` as
    convert's (a Grok-2 folder takes its own config.json or a Grok2Config)."""
    if grok2.detect(src):
        if config is None or isinstance(config, (str, Path)):
            config = Grok2Config.from_json(config or src / CONFIG_FILE)
        if not isinstance(config, Grok2Config):
            raise ConfigError(f"{src}: a Grok-2 folder takes its own config.json (or a "
                              f"Grok2Config), not {type(config).__name__}")
        return _Grok2Source(src, config), config.to_grok_config(), "grok-2"
    if isinstance(config, (str, Path)):
        config = GrokConfig.from_json(config)
    if config is None:
        config = (GrokConfig.from_json(src / CONFIG_FILE) if (src / CONFIG_FILE).is_file()
                  else GrokConfig.preset("grok-1"))
    family = "grok-1"
    if (src / INDEX_FILE).is_file():
        family = sharded_family(src)
    if (src / INDEX_FILE).is_file() or (src / WEIGHTS_FILE).is_file():
        return _SafetensorsSource(src, config), config, family
    return _ReleaseSource(src, config), config, family


# ---- the plan: which tensors go into which shard -------------------------------------------------

def plan_shards(config: GrokConfig, fmt: WeightFormat | None, order: list[str],
                shard_bytes: int) -> list[list[tuple[str, list[TensorSpec]]]]:
    """Parameters (in `order`, each with its output tensors) grouped into shards of at most
    `shard_bytes` (a parameter larger than that gets a shard of its own)."""
    with torch.device("meta"):
        model = Grok1(config, weights=fmt)
    state = model.state_dict()
    shards: list[list[tuple[str, list[TensorSpec]]]] = [[]]
    size = 0
    for name in order:
        specs = [(k, state[k].dtype, tuple(state[k].shape))
                 for k in state_keys(name, quantized=fmt is not None)]
        n = sum(_nbytes(s) for s in specs)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, specs))
        size += n
    return shards


def _nbytes(spec: TensorSpec) -> int:
    _, dtype, shape = spec
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


# ---- producing a parameter's output tensors, part by part ----------------------------------------

def _matrix_parts(stored: _Stored, fmt: WeightFormat | None, name: str
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """(output index, contiguous CPU tensor) in write order: the weight expert by expert, then
    the scales; each expert's bf16 reference is dequantized from the source and requantized."""
    shape = _shape(stored.weight)
    experts = shape[0] if len(shape) == 3 else None
    if fmt is not None and stored.fmt == fmt:  # the same format: the stored bytes as they are
        for e in range(experts or 1):
            yield 0, _part(stored.weight, e if experts else slice(None)).contiguous()
        if fmt is not None:
            yield 1, _part(stored.scales, slice(None)).contiguous()
        return
    groups = QUANT_GROUPS[name.split(".", 2)[2]]
    # experts in batches of about _CHUNK_BYTES of bf16: one at a time at Grok-1's widths,
    # all at once for small models (fewer, larger operations)
    per = max(1, _CHUNK_BYTES // (2 * shape[-2] * shape[-1])) if experts else 1
    scales = []
    for e in range(0, experts or 1, per):
        index = slice(e, e + per) if experts else slice(None)
        w = _part(stored.weight, index)
        ref = (dequantize_as(stored.fmt, w, _part(stored.scales, index)) if stored.fmt
               else w.to(torch.bfloat16))
        if fmt is None:
            yield 0, ref.contiguous()
            continue
        q, s = quantize_as(fmt, ref, groups)
        yield 0, q.contiguous()
        scales.append(s)
    if fmt is not None:
        yield 1, torch.cat(scales).contiguous()


def _plain_parts(stored: _Stored, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """A plain tensor in row blocks of about _CHUNK_BYTES, converted to `dtype`."""
    shape = _shape(stored.weight)
    if len(shape) < 2:
        yield 0, _part(stored.weight, slice(None)).to(dtype).contiguous()
        return
    row_bytes = max(1, _nbytes(("", torch.float32, shape[1:])))
    rows = max(1, _CHUNK_BYTES // row_bytes)
    for r in range(0, shape[0], rows):
        yield 0, _part(stored.weight, slice(r, r + rows)).to(dtype).contiguous()


# ---- writing -------------------------------------------------------------------------------------

def _write_shard(path: Path, params: list[tuple[str, list[TensorSpec]]], source,
                 fmt: WeightFormat | None, bar: tqdm) -> str:
    """One shard, header first, then each tensor's parts as they are made; its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        def put(data: memoryview | bytes) -> None:
            f.write(data)
            h.update(data)

        put(safetensors_header([s for _, specs in params for s in specs], format_metadata(fmt)))
        for name, specs in params:
            stored = source.stored(name)
            parts = (_matrix_parts(stored, fmt, name) if is_quantized_name(name)
                     else _plain_parts(stored, specs[0][1]))
            written = [0] * len(specs)
            for i, t in parts:  # a matrix's weight comes whole before its scales
                key, dtype, shape = specs[i]
                if t.dtype != dtype or any(written[i + 1:]):
                    raise CheckpointError(f"{key}: {dtype} {shape} expected, the source gives "
                                          f"{t.dtype} {tuple(t.shape)} out of order")
                put(tensor_bytes(t))
                n = t.numel() * t.element_size()
                written[i] += n
                bar.update(n)
            for spec, n in zip(specs, written, strict=True):
                if n != _nbytes(spec):
                    raise CheckpointError(f"{spec[0]}: {n} bytes from the source, {_nbytes(spec)}"
                                          f" expected for shape {spec[2]}; wrong config?")
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def _write_json(path: Path, obj: object) -> None:
    """Written aside and renamed: a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def convert(src: str | Path, dst: str | Path, weights: str | None = "int8", *,
            group_size: int = INT4_GROUP_SIZE,
            config: GrokConfig | Grok2Config | str | Path | None = None,
            shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
            after_shard: Callable[[int], None] | None = None) -> Path:
    """Convert the checkpoint `src` into a sharded grok1 folder `dst` with `weights` "int8",
    "int4" (groups of `group_size` inputs) or "fp8" attention and expert matrices (None: bf16).

    `src`: a release folder (holding ckpt-0/, or ckpt-0 itself), a grok1 folder (a
    `model.safetensors` or an index as written here), or a Grok-2 release folder (bf16: its
    dense MLP, head and embedding stay bf16, its attention and expert matrices take
    `weights`). `config`: a GrokConfig or JSON file (a Grok2Config or Grok-2's config.json for
    a Grok-2 folder); default the folder's config.json, else the `grok-1` preset. The index
    names the model's family ("grok-1", "grok-2": which tokenizer, copied beside the shards,
    reads its text). `after_shard(n)` is called after
    each shard is finished and recorded (n shards done so far; a test hook: raising there
    interrupts the conversion as a kill would). An interrupted conversion resumes when called
    again with the same arguments. Returns `dst`.

    Raises CheckpointError: `dst` exists, a corrupt or mismatched source (naming the file),
    or an interrupted conversion with other settings in the way.
    """
    src, dst = Path(src), Path(dst)
    fmt = weight_format(weights, group_size) if weights is not None else None
    if dst.exists():
        raise CheckpointError(f"{dst} exists; convert into a new folder")
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint folder")
    source, config, family = _open_source(src, config)
    shards = plan_shards(config, fmt, source.order, shard_bytes)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    settings = {"source": str(src.resolve()), "weights": fmt.label() if fmt else "bf16",
                "shard_bytes": shard_bytes, "config": dataclasses.asdict(config),
                "shards": names}
    work = dst.parent / f".{dst.name}.partial"
    done = _resume_state(work, settings)
    total = sum(_nbytes(s) for shard in shards for _, specs in shard for s in specs)
    kept = sum(_nbytes(s) for name, shard in zip(names, shards, strict=True) if name in done
               for _, specs in shard for s in specs)
    bar = tqdm(total=total, initial=kept, unit="B", unit_scale=True,
               desc=f"converting to {weights or 'bf16'}", disable=not progress)
    with bar:
        for name, params in zip(names, shards, strict=True):
            if name in done:
                continue
            partial = work / (name + ".partial")
            digest = _write_shard(partial, params, source, fmt, bar)
            os.replace(partial, work / name)
            done[name] = digest
            _write_json(work / STATE_FILE, {**settings, "done": done})
            if after_shard is not None:
                after_shard(len(done))
    source.close()
    weight_map = {key: name for name, params in zip(names, shards, strict=True)
                  for _, specs in params for key, _, _ in specs}
    meta = {**format_metadata(fmt), "total_size": total, "sha256": done, "family": family}
    _write_json(work / INDEX_FILE, {"metadata": meta, "weight_map": weight_map})
    config.save_json(work / CONFIG_FILE)
    tokenizer_file = TOKENIZER_FILE if family == "grok-1" else GROK2_TOKENIZER_FILE
    for tokenizer in (src / tokenizer_file, src.parent / tokenizer_file):
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, work / tokenizer_file)
            break
    (work / STATE_FILE).unlink()
    os.rename(work, dst)
    return dst


def _resume_state(work: Path, settings: dict) -> dict[str, str]:
    """The shards an interrupted conversion into `work` finished (file -> sha256), each
    checked against its recorded checksum (a mismatch is redone); a fresh `work` otherwise."""
    state_path = work / STATE_FILE
    if not state_path.is_file():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return {}
    state = json.loads(state_path.read_text())
    done = state.pop("done", {})
    if state != settings:
        differ = sorted(k for k in settings if state.get(k) != settings[k])
        raise CheckpointError(f"{work}: an interrupted conversion with other settings "
                              f"({', '.join(differ)}) is in the way; delete it, or convert again "
                              "with its settings to finish it")
    kept = {}
    for p in work.iterdir():
        if p.name in done and sha256_file(p) == done[p.name]:
            kept[p.name] = done[p.name]
        elif p.name != STATE_FILE:
            p.unlink()  # half-written, or not what was recorded: written again
    return kept


# ---- reading -------------------------------------------------------------------------------------

def is_sharded_native(path: str | Path) -> bool:
    """Whether `path` is a folder in this module's format (for a loader's format table)."""
    return (Path(path) / INDEX_FILE).is_file()


def sharded_family(folder: Path) -> str:
    """The model family a converted folder's index declares ("grok-1" when it predates the
    field); CheckpointError for one grok1 does not know."""
    family = read_index(folder)["metadata"].get("family", "grok-1")
    if family not in FAMILIES:
        raise CheckpointError(f"{folder.name}/{INDEX_FILE}: metadata family={family!r}; "
                              f"expected one of {', '.join(FAMILIES)}")
    return family


def read_index(folder: Path) -> dict:
    where = f"{folder.name}/{INDEX_FILE}"
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: not a readable index ({e})") from e
    if not isinstance(index.get("weight_map"), dict) or not isinstance(index.get("metadata"),
                                                                       dict):
        raise CheckpointError(f"{where}: no weight_map and metadata; not a sharded checkpoint")
    return index


def sharded_format(folder: Path) -> WeightFormat | None:
    """The weight format a sharded folder's index declares (None: bf16 matrices)."""
    return metadata_format(read_index(folder)["metadata"], f"{folder.name}/{INDEX_FILE}")


def verify_shards(folder: Path, index: dict) -> None:
    """Every shard's sha256 against the index; CheckpointError naming the first that differs."""
    sums = index["metadata"].get("sha256") or {}
    for name in sorted(set(index["weight_map"].values())):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder.name}/{name} missing (listed in {INDEX_FILE})")
        digest = sha256_file(path)
        if digest != sums.get(name):
            raise CheckpointError(f"{folder.name}/{name}: sha256 {digest[:16]}... does not match "
                                  f"the index's {str(sums.get(name))[:16]}...; corrupt or "
                                  "incomplete, fetch or convert it again")


def load_sharded_native(folder: str | Path, config: GrokConfig | None = None, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        shard_fn: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                        build: Callable[..., Grok1] | None = None,
                        verify: bool = False) -> Grok1:
    """The Grok1 in a sharded grok1 folder (written by `convert`), in its weight format.

    `config` defaults to the folder's config.json; `dtype` is the embedding's (default as
    stored). Each tensor is read from its file memory-mapped; `shard_fn(key, tensor)` (as in
    load_xai_checkpoint: the full stored tensor, mapped, so a slice reads only its pages)
    returns this process's piece of it, and `build(config, weights, dtype)` the (meta) model of
    this process's shapes to fill. `verify` checks every file's sha256 first (reads all).
    Raises CheckpointError naming the file and tensor for anything that does not fit the model.
    """
    folder = Path(folder)
    index = read_index(folder)
    fmt = metadata_format(index["metadata"], f"{folder.name}/{INDEX_FILE}")
    if verify:
        verify_shards(folder, index)
    if config is None:
        config = GrokConfig.from_json(folder / CONFIG_FILE)
    weight_map: dict[str, str] = index["weight_map"]
    if build is not None:
        model = build(config, fmt, dtype or torch.bfloat16)
    else:
        with torch.device("meta"):
            model = Grok1(config, weights=fmt, dtype=dtype or torch.bfloat16)
    targets = model.state_dict(keep_vars=True)
    if mismatch := name_mismatch(targets, weight_map):
        raise CheckpointError(f"{folder.name}/{INDEX_FILE} does not match its config "
                              f"({config.num_layers} layers, {fmt.label() if fmt else 'bf16'}): "
                              + mismatch)
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    device = torch.device(device)
    for name, keys in by_file.items():
        where = f"{folder.name}/{name}"
        try:
            f = safe_open(folder / name, framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from e
        for key in keys:
            target = targets[key]
            stored = _TORCH_DTYPES.get(f.get_slice(key).get_dtype())
            exact = key.endswith((".weight", ".scales")) and fmt is not None and \
                is_quantized_name(key.rsplit(".", 1)[0])
            if stored is None or (exact and stored != target.dtype):
                raise CheckpointError(f"{where}: {key} dtype {target.dtype} expected, file has "
                                      f"{f.get_slice(key).get_dtype()}")
            t = f.get_tensor(key)
            if shard_fn is not None:
                t = shard_fn(key, t)
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(f"{where}: {key} shape {tuple(target.shape)} expected, "
                                      f"{'shard_fn gives' if shard_fn else 'file has'} "
                                      f"{tuple(t.shape)}")
            assign_tensor(model, key, t.to(device=device, dtype=target.dtype))
    return model.eval().requires_grad_(False)
