"""The xAI release checkpoint `ckpt-0/tensorNNNNN_000`: read without running code, in parallel.

Each file is one pickle (protocol 4, numpy 1.26) of a numpy array (f32: embedding, norms, router)
or a `__main__.QuantizedWeight8bit` holding an int8 `weight` and bf16 `scales` (SPEC sections 3-4).
File i holds the reference's i-th parameter in jax flatten order (`names.xai_parameter_order`).

Loading never unpickles: xai_pickle_reader.py interprets the files with inert stand-ins for the
few globals they name and refuses anything else (UnsafePickleError). Every file is scanned (and
its shapes checked against the config) before any tensor data is read. Then each tensor's bytes
are read once, by all reader threads at once in spans of a file: on the CPU a tensor the model
keeps as stored (the int8 weights: nearly all the bytes) stays memory-mapped from its file,
private (copy-on-write) and populated by the kernel during the load, so that a warm load maps
the page cache instead of copying it and the model's memory is that of its files; the rest
(the f32 embedding, converted to bf16 span by span) is read through a small staging buffer
into the model's own memory, touched once. So the release files must not be truncated or
rewritten in place while a model loaded from them lives (as for any memory-mapped load).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import mmap
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from grok1.checkpoint.names import (
    CheckpointError,
    ShardFn,
    XaiEntry,
    assign_tensor,
    is_quantized_name,
    state_keys,
    xai_file_name,
    xai_parameter_order,
)
from grok1.checkpoint.xai_pickle_reader import (  # UnsafePickleError: re-exported
    ArrayRef,
    QuantRef,
    UnsafePickleError,
    array_in_map,
    dtype_name,
    map_array,
    map_file,
    open_regular,
    populate,
    populate_mapped,
    prefault,
    read_array,
    read_elements,
    scan_xai_file,
)
from grok1.config import GrokConfig
from grok1.model import Grok1
from grok1.quant import dequantize

__all__ = ["ShardFn", "UnsafePickleError", "check_file_set", "find_ckpt0", "iter_xai_tensors",
           "load_xai_checkpoint", "release_specs", "resolve_ckpt0", "scan_xai_checkpoint",
           "scan_xai_file"]

_TENSOR_FILE = re.compile(r"tensor\d{5}_\d{3}")


# ---- the checkpoint: file set, expected shapes, streaming ----------------------------------------

def find_ckpt0(path: str | Path) -> Path | None:
    """`path/ckpt-0` if there is one, else `path` itself when it holds tensor files, else None."""
    path = Path(path)
    if (path / "ckpt-0").is_dir():
        return path / "ckpt-0"
    if path.is_dir() and any(_TENSOR_FILE.fullmatch(p.name) for p in path.iterdir()):
        return path
    return None


def resolve_ckpt0(path: str | Path) -> Path:
    """find_ckpt0, or CheckpointError saying where the release's files go."""
    found = find_ckpt0(path)
    if found is not None:
        return found
    raise CheckpointError(f"{path}: no ckpt-0/ folder and no tensorNNNNN_000 files in it; the "
                          "release's 770 files tensor00000_000 ... tensor00769_000 go in "
                          "checkpoints/ckpt-0/")


def release_specs(config: GrokConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """State-dict key -> (shape, dtype) of every tensor in a release checkpoint for `config`."""
    with torch.device("meta"):
        model = Grok1(config, quantized=True)
    specs = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    specs["embed"] = (specs["embed"][0], torch.float32)  # the model keeps it in bf16
    return specs


def check_file_set(ckpt_dir: Path, config: GrokConfig) -> list[XaiEntry]:
    """The files `config` implies, in order; raises CheckpointError for missing or extra ones."""
    entries = xai_parameter_order(config.num_layers)
    present = {p.name for p in ckpt_dir.iterdir() if _TENSOR_FILE.fullmatch(p.name)}
    expected = {xai_file_name(e.file_index): e for e in entries}
    missing = [name for name in expected if name not in present]
    if missing:
        more = f"; {len(missing)} files missing in all" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt_dir.name}/{missing[0]} ({expected[missing[0]].grok1_name}) "
                              f"missing; expected {len(entries)} files for {config.num_layers} "
                              f"layers{more}")
    extra = sorted(present - expected.keys())
    if extra:
        raise CheckpointError(f"{ckpt_dir.name} has {len(present)} tensor files ({extra[0]} and "
                              f"{len(extra) - 1} more unexpected), but the config's "
                              f"{config.num_layers} layers imply {len(entries)}; wrong config?")
    return entries


def _check_entry(ref: ArrayRef | QuantRef, entry: XaiEntry, where: str,
                 specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Compare a scanned file with the shapes and dtypes `config` implies for its parameter."""
    label = f"{where} ({entry.grok1_name})"
    if is_quantized_name(entry.grok1_name):
        if not isinstance(ref, QuantRef):
            raise CheckpointError(f"{label}: QuantizedWeight8bit (int8 weight + bf16 scales) "
                                  f"expected, file has a {dtype_name(ref.dtype)} array "
                                  f"{ref.shape}")
        parts = (("weight", ref.weight), ("scales", ref.scales))
    else:
        if not isinstance(ref, ArrayRef):
            raise CheckpointError(f"{label}: a float32 array expected, file has a "
                                  f"QuantizedWeight8bit")
        parts = (("", ref),)
    for part, array in parts:
        key = f"{entry.grok1_name}.{part}" if part else entry.grok1_name
        shape, dtype = specs[key]
        what = f"{part} " if part else ""
        if array.shape != shape:
            raise CheckpointError(f"{label}: {what}shape {shape} expected, file has {array.shape}")
        if array.dtype != dtype:
            raise CheckpointError(f"{label}: {what}dtype {dtype_name(dtype)} expected, file has "
                                  f"{dtype_name(array.dtype)}")


def _refs(ref: ArrayRef | QuantRef, entry: XaiEntry) -> list[tuple[str, ArrayRef]]:
    if isinstance(ref, QuantRef):
        return list(zip(state_keys(entry.grok1_name, True), (ref.weight, ref.scales), strict=True))
    return [(entry.grok1_name, ref)]


def _nbytes(ref: ArrayRef | QuantRef) -> int:
    return ref.weight.nbytes + ref.scales.nbytes if isinstance(ref, QuantRef) else ref.nbytes


def scan_xai_checkpoint(ckpt_dir: str | Path, config: GrokConfig, *,
                        workers: int = 8) -> list[tuple[XaiEntry, ArrayRef | QuantRef]]:
    """Every file of a release checkpoint scanned and checked against `config`, before any
    tensor data is read. Raises CheckpointError / UnsafePickleError naming the first bad file."""
    ckpt_dir = resolve_ckpt0(ckpt_dir)
    entries = check_file_set(ckpt_dir, config)
    specs = release_specs(config)

    def scan(entry: XaiEntry) -> ArrayRef | QuantRef:
        name = xai_file_name(entry.file_index)
        where = f"{ckpt_dir.name}/{name}"
        ref = scan_xai_file(ckpt_dir / name, f"{where} ({entry.grok1_name})")
        _check_entry(ref, entry, where, specs)
        return ref

    with cf.ThreadPoolExecutor(workers) as pool:  # small reads and seeks; latency-bound
        return list(zip(entries, pool.map(scan, entries), strict=True))


def iter_xai_tensors(ckpt_dir: str | Path,
                     config: GrokConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, CPU tensor as stored) for every tensor of a release checkpoint, in file
    order, one file at a time: int8 `.weight` and bf16 `.scales` of the quantized matrices, f32
    for the rest (the embedding too). All files are checked first (see scan_xai_checkpoint)."""
    ckpt_dir = resolve_ckpt0(ckpt_dir)
    for entry, ref in scan_xai_checkpoint(ckpt_dir, config):
        name = xai_file_name(entry.file_index)
        where = f"{ckpt_dir.name}/{name} ({entry.grok1_name})"
        with open_regular(ckpt_dir / name, where, buffering=0) as f:
            for key, array in _refs(ref, entry):
                yield key, read_array(f, array, where)


def load_xai_checkpoint(ckpt_dir: str | Path, config: GrokConfig, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        model: Grok1 | None = None, shard_fn: ShardFn | None = None,
                        workers: int = 8, max_inflight_bytes: int = 8 << 30,
                        progress: bool = True) -> Grok1:
    """A Grok1 holding the release checkpoint `ckpt_dir` (the ckpt-0 folder or its parent).

    The model is built on the meta device (or `model` is used, normally built on meta) and each
    tensor is assigned in place of its meta tensor, so the weights exist once. By default it is
    quantized: int8 weights and bf16 scales as released; the f32 embedding becomes `dtype`
    (exact for bf16: the reference casts it to bf16 before use); norms and router stay f32. A
    dense `model` gets the quantized matrices dequantized to its dtype.

    Files are scanned and checked first (shapes, dtypes, truncation). Then, whole (no
    `shard_fn`), every tensor is read by `workers` threads in spans of _SPAN_BYTES of the file,
    so that a large file is read by all of them at once. A CPU tensor of the stored dtype whose
    bytes are aligned in the file (the int8 weights) is the file's private memory map, each
    span populated (read into the page cache and mapped) during the load; another one of the
    stored dtype is read straight into its memory; the rest go through a per-thread staging
    buffer of _SPAN_BYTES, converted (the f32 embedding to bf16) and moved to `device` span by
    span, so no full-size f32 copy and no host copy of a GPU model is made. Per rank
    (`shard_fn`), files are memory-mapped and read by whole tensors, with at most
    `max_inflight_bytes` of them mapped but not yet placed; on the CPU a rank's piece that is
    contiguous in the file (rows, experts, a whole tensor) stays mapped and is read during the
    load, a strided one (columns) is copied out.

    shard_fn(key, tensor) -> tensor, for sharded loading: called in a worker thread for each
    state-dict key of the model (`layers.3.attn.wo.weight`, `layers.3.attn.wo.scales`, `embed`,
    `layers.3.moe.router`, ...) with the full CPU tensor as stored in the file (int8 weight,
    bf16 scales, f32 otherwise), memory-mapped so that slicing it reads only the slice's pages,
    before the dtype conversion and the move to `device`; it returns this rank's piece (a view
    is fine: kept mapped or copied out, as above), whose shape must equal the model's (the
    model was built with local shapes). A quantized matrix's weight and scales are passed one
    after the other, weight first; scales [(E,) G, out] have G = 1 or 8 groups along the input
    dim, so a slice of the input dim must take the matching groups (or repeat a group when it
    splits one). It is not called for a dense model's dequantized matrices before
    dequantization: it gets the bf16 matrix instead.

    Raises CheckpointError (missing, extra, truncated or mis-shaped files; a shard_fn shape that
    the model does not expect) and UnsafePickleError (a pickle asking for anything else).
    """
    ckpt_dir = resolve_ckpt0(ckpt_dir)
    scanned = scan_xai_checkpoint(ckpt_dir, config, workers=max(workers, 8))
    if model is None:
        with torch.device("meta"):
            model = Grok1(config, quantized=True, dtype=dtype)
    targets = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    device = torch.device(device)
    total = sum(_nbytes(ref) for _, ref in scanned)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {ckpt_dir}",
               disable=not progress)
    def whole(entry: XaiEntry, ref: ArrayRef | QuantRef) -> bool:
        """A dense model's matrices are dequantized from the whole int8 weight and scales."""
        return shard_fn is not None or (
            isinstance(ref, QuantRef) and not model.get_submodule(entry.grok1_name).quantized)

    by_span = [(e, ref) for e, ref in scanned if not whole(e, ref)]
    by_tensor = [(e, ref) for e, ref in scanned if whole(e, ref)]
    with bar, cf.ThreadPoolExecutor(workers) as pool:
        try:
            _load_spans(ckpt_dir, by_span, model, targets, device, pool, bar)
            _load_tensors(ckpt_dir, by_tensor, model, targets, device, shard_fn, pool, bar,
                          max_inflight_bytes)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    left = [k for k, v in itertools.chain(model.named_parameters(), model.named_buffers())
            if v.is_meta]
    if left:
        raise CheckpointError(f"{ckpt_dir}: {len(left)} model tensors not in the checkpoint: "
                              f"{', '.join(left[:10])}")
    return model


_SPAN_BYTES = 16 << 20  # of a file per read: parallel reads of one file, a bounded staging buffer


def _target_error(where: str, key: str, targets: dict[str, torch.Tensor],
                  shape: tuple[int, ...], how: str = "") -> CheckpointError | None:
    if key not in targets:
        return CheckpointError(f"{where}: the model has no {key}")
    if tuple(shape) != tuple(targets[key].shape):
        return CheckpointError(f"{where}: {key} has shape {tuple(shape)}{how}, the model "
                               f"expects {tuple(targets[key].shape)}")
    return None


def _load_spans(ckpt_dir: Path, scanned: list[tuple[XaiEntry, ArrayRef | QuantRef]],
                model: Grok1, targets: dict[str, torch.Tensor], device: torch.device,
                pool: cf.ThreadPoolExecutor, bar: tqdm) -> None:
    """Whole tensors, span by span in parallel, into their final tensors (see above)."""
    local = threading.local()  # each thread's staging buffer, made on its first conversion
    pin = device.type == "cuda"

    def staging() -> torch.Tensor:
        if not hasattr(local, "buf"):
            local.buf = torch.empty(_SPAN_BYTES, dtype=torch.uint8, pin_memory=pin)
        return local.buf

    def read_span(path: Path, where: str, ref: ArrayRef, out: torch.Tensor, start: int,
                  stop: int) -> int:
        with open_regular(path, where, buffering=0) as f:
            direct = out.device.type == "cpu" and out.dtype == ref.dtype
            prefault(out[start:stop])  # the model's own memory, written once below
            read_elements(f.fileno(), ref, where, out, start, stop,
                          None if direct else staging())
        return (stop - start) * ref.dtype.itemsize

    def map_span(mapped: mmap.mmap, where: str, ref: ArrayRef, start: int, stop: int) -> int:
        populate(mapped, ref, start, stop, where)
        return (stop - start) * ref.dtype.itemsize

    pending: dict[cf.Future, str] = {}
    left: dict[str, int] = {}  # spans still to read, per key
    outs: dict[str, torch.Tensor] = {}
    for entry, ref in scanned:
        name = xai_file_name(entry.file_index)
        where = f"{ckpt_dir.name}/{name} ({entry.grok1_name})"
        mapped = None
        for key, array in _refs(ref, entry):
            if error := _target_error(where, key, targets, array.shape):
                raise error
            mappable = _mappable(array, targets[key], device)
            if mappable:
                mapped = map_file(ckpt_dir / name) if mapped is None else mapped
                out = array_in_map(mapped, array, where)
            else:
                out = torch.empty(array.shape, dtype=targets[key].dtype, device=device)
            outs[key] = out
            numel = out.numel()
            step = max(1, _SPAN_BYTES // array.dtype.itemsize)
            spans = [(s, min(s + step, numel)) for s in range(0, numel, step)] or [(0, 0)]
            left[key] = len(spans)
            for s, e in spans:
                if mappable:
                    fut = pool.submit(map_span, mapped, where, array, s, e)
                else:
                    fut = pool.submit(read_span, ckpt_dir / name, where, array, out.view(-1),
                                      s, e)
                pending[fut] = key
    for fut in cf.as_completed(pending):
        bar.update(fut.result())
        key = pending[fut]
        left[key] -= 1
        if not left[key]:
            assign_tensor(model, key, outs.pop(key))


def _mappable(ref: ArrayRef, target: torch.Tensor, device: torch.device) -> bool:
    """Whether the model can hold the file's bytes as they are, mapped: a CPU tensor of the
    stored dtype whose data is aligned for it in the file (the int8 weights always are)."""
    return (device.type == "cpu" and target.dtype == ref.dtype and ref.data is None
            and ref.offset % ref.dtype.itemsize == 0 and ref.nbytes > 0)


def _load_tensors(ckpt_dir: Path, scanned: list[tuple[XaiEntry, ArrayRef | QuantRef]],
                  model: Grok1, targets: dict[str, torch.Tensor], device: torch.device,
                  shard_fn: ShardFn | None, pool: cf.ThreadPoolExecutor, bar: tqdm,
                  max_inflight_bytes: int) -> None:
    """Tensors read whole: mapped and cut by shard_fn, or dequantized for a dense model."""
    def load_one(entry: XaiEntry, ref: ArrayRef | QuantRef) -> dict[str, torch.Tensor]:
        name = xai_file_name(entry.file_index)
        where = f"{ckpt_dir.name}/{name} ({entry.grok1_name})"
        if shard_fn is not None:  # mapped: a rank's slice reads only its own pages
            raw = {key: map_array(ckpt_dir / name, array) for key, array in _refs(ref, entry)}
        else:
            with open_regular(ckpt_dir / name, where, buffering=0) as f:
                raw = {key: read_array(f, array, where) for key, array in _refs(ref, entry)}
        dense_key = entry.grok1_name + ".weight"
        if isinstance(ref, QuantRef) and not model.get_submodule(entry.grok1_name).quantized:
            raw = {dense_key: dequantize(*raw.values())}  # a dense model: bf16 matrices
        out = {}
        for key, t in raw.items():
            if key not in targets:
                raise CheckpointError(f"{where}: the model has no {key}")
            if shard_fn is not None:
                t = shard_fn(key, t)
            how = " after shard_fn" if shard_fn is not None else ""
            if error := _target_error(where, key, targets, t.shape, how):
                raise error
            moved = t.to(device=device, dtype=targets[key].dtype)
            if shard_fn is not None and moved.data_ptr() == t.data_ptr():
                # still the file's map: a contiguous, aligned piece (rows, experts, a whole
                # tensor) stays mapped and is read now; a strided one (columns) is copied out
                if moved.is_contiguous() and moved.data_ptr() % moved.element_size() == 0:
                    populate_mapped(moved)
                else:
                    moved = moved.clone()
            out[key] = moved
        return out

    todo = iter(scanned)
    nxt = next(todo, None)
    pending: dict[cf.Future, int] = {}
    inflight = 0
    while nxt is not None or pending:
        while nxt is not None and (not pending or inflight + _nbytes(nxt[1])
                                   <= max_inflight_bytes):
            pending[pool.submit(load_one, *nxt)] = _nbytes(nxt[1])
            inflight += _nbytes(nxt[1])
            nxt = next(todo, None)
        done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for fut in done:
            for key, t in fut.result().items():
                assign_tensor(model, key, t)
            n = pending.pop(fut)
            inflight -= n
            bar.update(n)
