"""The xAI release checkpoint `ckpt-0/tensorNNNNN_000`: read without running code, in parallel.

Each file is one pickle (protocol 4, numpy 1.26) of a numpy array (f32: embedding, norms, router)
or a `__main__.QuantizedWeight8bit` holding an int8 `weight` and bf16 `scales` (SPEC sections 3-4).
File i holds the reference's i-th parameter in jax flatten order (`names.xai_parameter_order`).

Loading never unpickles. A small pickle interpreter (`_PickleReader`) understands only the
opcodes these files use, and the only globals it resolves are inert stand-ins for numpy's array
reconstruction, numpy dtypes (incl. ml_dtypes.bfloat16) and QuantizedWeight8bit; anything else
raises UnsafePickleError. The big byte strings are not read while interpreting: the reader notes
where they sit and skips them, so every file is scanned (and its shapes checked against the
config) before any tensor data is read, and each tensor's bytes are then read exactly once,
straight into the tensor that keeps them (no /dev/shm copy, no intermediate bytes object).
(pickle.Unpickler with an allow-list find_class would be as safe, but it reads each payload into
a bytes object first: a second copy of up to 3.2 GB per file, and no check before reading.)
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import io
import itertools
import math
import mmap
import pickletools
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from grok1.checkpoint.names import (
    CheckpointError,
    XaiEntry,
    assign_tensor,
    is_quantized_name,
    state_keys,
    xai_file_name,
    xai_parameter_order,
)
from grok1.config import GrokConfig
from grok1.model import Grok1
from grok1.quant import dequantize

ShardFn = Callable[[str, torch.Tensor], torch.Tensor]
_TENSOR_FILE = re.compile(r"tensor\d{5}_\d{3}")
_ALLOWED = "numpy arrays, ml_dtypes.bfloat16, __main__.QuantizedWeight8bit"


class UnsafePickleError(CheckpointError):
    """A checkpoint pickle asking for more than numpy arrays and QuantizedWeight8bit."""


# ---- what a file holds, once interpreted --------------------------------------------------------

@dataclass(frozen=True)
class ArrayRef:
    """One array in a file: shape, dtype, and where its bytes are (or the bytes, if small)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None  # byte offset of the raw data in the file, or None when `data` holds it
    data: bytes | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class QuantRef:
    weight: ArrayRef
    scales: ArrayRef


# ---- the pickle interpreter ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Payload:
    """A byte string left in the file: BINBYTES longer than _INLINE_MAX is skipped, not read."""
    offset: int
    nbytes: int


_INLINE_MAX = 4096


class _Allowed:
    """An inert stand-in for one allowed global; only _PickleReader gives it meaning."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_RECONSTRUCT = _Allowed("numpy.core.multiarray._reconstruct")
_NDARRAY = _Allowed("numpy.ndarray")
_DTYPE = _Allowed("numpy.dtype")
_BFLOAT16 = _Allowed("ml_dtypes.bfloat16")
_QUANTIZED = _Allowed("__main__.QuantizedWeight8bit")
_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # what numpy >= 2 writes
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
    ("__main__", "QuantizedWeight8bit"): _QUANTIZED,
}
_NUMPY_DTYPES = {
    "f2": torch.float16, "f4": torch.float32, "f8": torch.float64, "b1": torch.bool,
    "i1": torch.int8, "i2": torch.int16, "i4": torch.int32, "i8": torch.int64, "u1": torch.uint8,
}


class _DtypeStub:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.built = False


class _ArrayStub:
    def __init__(self) -> None:
        self.ref: ArrayRef | None = None


class _QuantStub:
    def __init__(self) -> None:
        self.ref: QuantRef | None = None


_OPNAMES = {op.code.encode("latin-1"): op.name for op in pickletools.opcodes}


class _PickleReader:
    """Interprets the pickle opcodes numpy writes for arrays; everything else is refused.

    `where` names the file in messages. Byte strings longer than _INLINE_MAX are skipped over
    (recorded as _Payload) and checked to lie within the file.
    """

    def __init__(self, f: io.BufferedReader, size: int, where: str):
        self.f, self.size, self.where = f, size, where
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    # -- reading
    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise CheckpointError(f"{self.where}: truncated: the pickle stops at byte {self.size} "
                                  f"before its end; fetch the file again")
        return b

    def unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def read_bytes(self, n: int) -> bytes | _Payload:
        if n <= _INLINE_MAX:
            return self.read(n)
        offset = self.f.tell()
        if offset + n > self.size:
            raise CheckpointError(f"{self.where}: truncated: {_fmt_bytes(self.size - offset)} of "
                                  f"{_fmt_bytes(n)} of tensor data present; fetch the file again")
        self.f.seek(n, io.SEEK_CUR)
        return _Payload(offset, n)

    def pop_mark(self) -> list:
        k = self.marks.pop()
        items, self.stack[k:] = self.stack[k:], []
        return items

    def refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.where} {what}; allowed: {_ALLOWED}")

    # -- interpreting
    def run(self) -> ArrayRef | QuantRef:
        stack, memo = self.stack, self.memo
        while True:
            pos = self.f.tell()
            op = self.read(1)
            if op == b"\x80":  # PROTO
                if self.read(1)[0] > 5:
                    raise CheckpointError(f"{self.where}: not a pickle of protocol <= 5")
            elif op == b"\x95":  # FRAME: a buffering hint; the data is contiguous anyway
                self.read(8)
            elif op == b".":  # STOP
                return self.result(stack)
            elif op == b"(":
                self.marks.append(len(stack))
            elif op == b"\x94":  # MEMOIZE
                memo[len(memo)] = stack[-1]
            elif op in (b"q", b"r"):  # BINPUT, LONG_BINPUT
                memo[self.unpack("<B" if op == b"q" else "<I")] = stack[-1]
            elif op in (b"h", b"j"):  # BINGET, LONG_BINGET
                key = self.unpack("<B" if op == b"h" else "<I")
                if key not in memo:
                    raise CheckpointError(f"{self.where}: corrupt pickle (memo {key}, byte {pos})")
                stack.append(memo[key])
            elif op == b"N":
                stack.append(None)
            elif op in (b"\x88", b"\x89"):  # NEWTRUE, NEWFALSE
                stack.append(op == b"\x88")
            elif op in (b"J", b"K", b"M"):  # BININT, BININT1, BININT2
                stack.append(self.unpack({b"J": "<i", b"K": "<B", b"M": "<H"}[op]))
            elif op == b"\x8a":  # LONG1
                stack.append(int.from_bytes(self.read(self.unpack("<B")), "little", signed=True))
            elif op in (b"\x8c", b"X", b"\x8d"):  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
                n = self.unpack({b"\x8c": "<B", b"X": "<I", b"\x8d": "<Q"}[op])
                if n > _INLINE_MAX:
                    raise CheckpointError(f"{self.where}: {n}-byte string; not a numpy pickle")
                stack.append(self.read(n).decode("utf-8"))
            elif op in (b"C", b"B", b"\x8e"):  # SHORT_BINBYTES, BINBYTES, BINBYTES8
                n = self.unpack({b"C": "<B", b"B": "<I", b"\x8e": "<Q"}[op])
                stack.append(self.read_bytes(n))
            elif op == b")":
                stack.append(())
            elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
                n = op[0] - 0x84
                if len(stack) < n:
                    raise IndexError(f"TUPLE{n} on a stack of {len(stack)}")
                stack[-n:] = [tuple(stack[-n:])]
            elif op == b"t":
                stack.append(tuple(self.pop_mark()))
            elif op == b"}":
                stack.append({})
            elif op in (b"s", b"u"):  # SETITEM, SETITEMS
                items = self.pop_mark() if op == b"u" else [stack.pop(-2), stack.pop()]
                target = stack[-1]
                if not isinstance(target, dict) or len(items) % 2:
                    raise CheckpointError(f"{self.where}: corrupt pickle (SETITEM at byte {pos})")
                for k, v in zip(items[::2], items[1::2], strict=True):
                    if not isinstance(k, str):
                        raise CheckpointError(f"{self.where}: dict key {k!r}; expected str")
                    target[k] = v
            elif op == b"c":  # GLOBAL "module\nname\n" (protocols 0-3)
                module = self.f.readline(256).decode("utf-8", "replace").rstrip("\n")
                name = self.f.readline(256).decode("utf-8", "replace").rstrip("\n")
                stack.append(self.find_global(module, name))
            elif op == b"\x93":  # STACK_GLOBAL
                name, module = stack.pop(), stack.pop()
                stack.append(self.find_global(module, name))
            elif op == b"R":  # REDUCE
                args = stack.pop()
                stack[-1] = self.call(stack[-1], args)
            elif op == b"\x81":  # NEWOBJ
                args, cls = stack.pop(), stack.pop()
                if cls is not _QUANTIZED or args != ():
                    raise self.refuse(f"creates {cls!r} with {_short(args)}")
                stack.append(_QuantStub())
            elif op == b"b":  # BUILD
                state = stack.pop()
                self.build(stack[-1], state)
            else:
                name = _OPNAMES.get(op, f"0x{op.hex()}")
                raise self.refuse(f"uses pickle opcode {name} at byte {pos}, which release "
                                  f"checkpoints never do")

    def find_global(self, module: object, name: object) -> _Allowed:
        found = _GLOBALS.get((module, name)) if isinstance(module, str) and isinstance(name, str) \
            else None
        if found is None:
            raise self.refuse(f"asks for {module}.{name}")
        return found

    def call(self, func: object, args: object) -> object:
        """REDUCE: only numpy's own two calls, with exactly the arguments numpy writes."""
        if func is _RECONSTRUCT and args == (_NDARRAY, (0,), b"b"):
            return _ArrayStub()
        numpy_dtype_args = isinstance(args, tuple) and len(args) == 3 and args[1:] == (False, True)
        if func is _DTYPE and numpy_dtype_args:
            code = args[0]
            if code is _BFLOAT16:
                return _DtypeStub(torch.bfloat16)
            if isinstance(code, str) and code in _NUMPY_DTYPES:
                return _DtypeStub(_NUMPY_DTYPES[code])
            raise CheckpointError(f"{self.where}: numpy dtype {code!r} is not supported")
        raise self.refuse(f"calls {func!r} with {_short(args)}")

    def build(self, obj: object, state: object) -> None:
        """BUILD: set the state of a dtype, an array or a QuantizedWeight8bit stand-in, once."""
        if isinstance(obj, _DtypeStub) and not obj.built:
            # (version 3, byte order, subarray, names, fields, elsize, alignment, flags)
            if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                    and state[2:5] == (None, None, None)):
                raise CheckpointError(f"{self.where}: unexpected numpy dtype state {_short(state)}")
            if state[1] == ">":
                raise CheckpointError(f"{self.where}: big-endian arrays are not supported")
            obj.built = True
        elif isinstance(obj, _ArrayStub) and obj.ref is None:
            obj.ref = self.array(state)
        elif isinstance(obj, _QuantStub) and obj.ref is None:
            if not (isinstance(state, dict) and state.keys() == {"weight", "scales"}
                    and all(isinstance(v, _ArrayStub) and v.ref for v in state.values())):
                raise CheckpointError(f"{self.where}: QuantizedWeight8bit state {_short(state)}; "
                                      f"expected {{'weight': array, 'scales': array}}")
            obj.ref = QuantRef(state["weight"].ref, state["scales"].ref)
        else:
            raise self.refuse(f"sets the state of {type(obj).__name__}")

    def array(self, state: object) -> ArrayRef:
        # ndarray.__setstate__((version 1, shape, dtype, fortran_order, raw bytes))
        ok = (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
              and isinstance(state[1], tuple)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in state[1])
              and isinstance(state[2], _DtypeStub) and state[2].built
              and isinstance(state[3], bool) and isinstance(state[4], (bytes, _Payload)))
        if not ok:
            raise CheckpointError(f"{self.where}: unexpected numpy array state {_short(state)}")
        _, shape, dtype, fortran_order, data = state
        if fortran_order and len(shape) > 1:
            raise CheckpointError(f"{self.where}: Fortran-ordered arrays are not supported")
        nbytes = data.nbytes if isinstance(data, _Payload) else len(data)
        ref = ArrayRef(shape, dtype.dtype, data.offset if isinstance(data, _Payload) else None,
                       data if isinstance(data, bytes) else None)
        if nbytes != ref.nbytes:
            raise CheckpointError(f"{self.where}: array {shape} {_dtype_name(ref.dtype)} needs "
                                  f"{ref.nbytes} bytes, the file has {nbytes}")
        return ref

    def result(self, stack: list) -> ArrayRef | QuantRef:
        if len(stack) != 1 or self.marks:
            raise CheckpointError(f"{self.where}: corrupt pickle (stack of {len(stack)} at STOP)")
        obj = stack[0]
        if isinstance(obj, (_ArrayStub, _QuantStub)) and obj.ref is not None:
            return obj.ref
        raise CheckpointError(f"{self.where}: holds {_short(obj)}, not a numpy array or "
                              f"QuantizedWeight8bit")


def _short(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def scan_xai_file(path: str | Path, where: str | None = None) -> ArrayRef | QuantRef:
    """What one release file holds (shapes, dtypes, data offsets), reading only its small parts.

    Raises UnsafePickleError for anything but numpy arrays / QuantizedWeight8bit, and
    CheckpointError for a truncated or malformed file. `where` names the file in messages.
    """
    path = Path(path)
    where = where or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return _PickleReader(f, size, where).run()
    except FileNotFoundError:
        raise CheckpointError(f"{where} missing") from None
    except (IndexError, TypeError, ValueError) as e:  # stack underflow, bad key, bad utf-8
        raise CheckpointError(f"{where}: corrupt pickle ({type(e).__name__}: {e})") from e


def read_array(f: io.RawIOBase | io.BufferedReader, ref: ArrayRef, where: str) -> torch.Tensor:
    """The CPU tensor behind `ref`, its bytes read from `f` straight into the tensor's memory."""
    t = torch.empty(ref.shape, dtype=ref.dtype)
    if ref.nbytes == 0:
        return t
    view = memoryview((ctypes.c_char * ref.nbytes).from_address(t.data_ptr())).cast("B")
    if ref.data is not None:
        view[:] = ref.data
        return t
    f.seek(ref.offset)
    done = 0
    while done < ref.nbytes:  # a read may return less than asked (and caps at 2 GB on Linux)
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{where}: truncated: {_fmt_bytes(ref.offset + done)} present, "
                                  f"{_fmt_bytes(ref.offset + ref.nbytes)} needed; fetch it again")
        done += n
    return t


def map_array(path: Path, ref: ArrayRef) -> torch.Tensor:
    """The CPU tensor behind `ref` as a private memory map of the file: nothing is read until
    used, so a slice of it reads only the pages it touches (per-rank sharded loading)."""
    if ref.data is not None or ref.nbytes == 0:
        with open(path, "rb", buffering=0) as f:
            return read_array(f, ref, path.name)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: file untouched
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=ref.nbytes, offset=ref.offset)
    return flat.view(ref.dtype).view(ref.shape)


# ---- the checkpoint: file set, expected shapes, streaming ----------------------------------------

def resolve_ckpt0(path: str | Path) -> Path:
    """`path/ckpt-0` if there is one, else `path` itself when it holds tensor files."""
    path = Path(path)
    if (path / "ckpt-0").is_dir():
        return path / "ckpt-0"
    if path.is_dir() and any(_TENSOR_FILE.fullmatch(p.name) for p in path.iterdir()):
        return path
    raise CheckpointError(f"{path}: no ckpt-0/ folder and no tensorNNNNN_000 files in it")


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
                                  f"expected, file has a {_dtype_name(ref.dtype)} array "
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
            raise CheckpointError(f"{label}: {what}dtype {_dtype_name(dtype)} expected, file has "
                                  f"{_dtype_name(array.dtype)}")


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
        with open(ckpt_dir / name, "rb", buffering=0) as f:
            for key, array in _refs(ref, entry):
                yield key, read_array(f, array, f"{ckpt_dir.name}/{name} ({entry.grok1_name})")


def load_xai_checkpoint(ckpt_dir: str | Path, config: GrokConfig, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        model: Grok1 | None = None, shard_fn: ShardFn | None = None,
                        workers: int = 8, max_inflight_bytes: int = 8 << 30,
                        progress: bool = True) -> Grok1:
    """A Grok1 holding the release checkpoint `ckpt_dir` (the ckpt-0 folder or its parent).

    The model is built on the meta device (or `model` is used, normally built on meta) and each
    tensor is assigned in place of its meta tensor as it arrives, so the weights exist once. By default it is quantized: int8
    weights and bf16 scales as released; the f32 embedding becomes `dtype` (exact for bf16: the
    reference casts it to bf16 before use); norms and router stay f32. A dense `model` gets the
    quantized matrices dequantized to its dtype.

    Files are scanned and checked first (shapes, dtypes, truncation), then read by `workers`
    threads with at most `max_inflight_bytes` of file data read but not yet placed (at least one
    file), each file read once, converted, moved to `device` and released.

    shard_fn(key, tensor) -> tensor, for sharded loading: called in a worker thread for each
    state-dict key of the model (`layers.3.attn.wo.weight`, `layers.3.attn.wo.scales`, `embed`,
    `layers.3.moe.router`, ...) with the full CPU tensor as stored in the file (int8 weight,
    bf16 scales, f32 otherwise), memory-mapped so that slicing it reads only the slice's pages,
    before the dtype conversion and the move to `device`; it returns this rank's piece (a view is
    fine: it is copied out of the map), whose shape must equal the model's (the model was built
    with local shapes). A quantized matrix's weight and scales are passed one after the other,
    weight first; scales [(E,) G, out] have G = 1 or 8 groups along the input dim, so a slice of
    the input dim must take the matching groups (or repeat a group when it splits one). It is
    not called for a dense model's dequantized matrices before dequantization: it gets the bf16
    matrix instead.

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

    def load_one(entry: XaiEntry, ref: ArrayRef | QuantRef) -> dict[str, torch.Tensor]:
        name = xai_file_name(entry.file_index)
        where = f"{ckpt_dir.name}/{name} ({entry.grok1_name})"
        if shard_fn is not None:  # mapped: a rank's slice reads only its own pages
            raw = {key: map_array(ckpt_dir / name, array) for key, array in _refs(ref, entry)}
        else:
            with open(ckpt_dir / name, "rb", buffering=0) as f:
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
            target = targets[key]
            if tuple(t.shape) != tuple(target.shape):
                how = " after shard_fn" if shard_fn is not None else ""
                raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}{how}, the "
                                      f"model expects {tuple(target.shape)}")
            moved = t.to(device=device, dtype=target.dtype)
            if shard_fn is not None and moved.data_ptr() == t.data_ptr():
                moved = moved.clone()  # never keep a file mapping in the model
            out[key] = moved
        return out

    total = sum(_nbytes(ref) for _, ref in scanned)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {ckpt_dir}",
               disable=not progress)
    todo = iter(scanned)
    nxt = next(todo, None)
    pending: dict[cf.Future, int] = {}
    inflight = 0
    with bar, cf.ThreadPoolExecutor(workers) as pool:
        try:
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
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    left = [k for k, v in itertools.chain(model.named_parameters(), model.named_buffers())
            if v.is_meta]
    if left:
        raise CheckpointError(f"{ckpt_dir}: {len(left)} model tensors not in the checkpoint: "
                              f"{', '.join(left[:10])}")
    return model

