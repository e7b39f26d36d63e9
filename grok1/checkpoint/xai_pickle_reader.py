"""A pickle reader for the release's tensor files that never runs code (SPEC section 4).

Each file is one pickle (protocol 4, numpy 1.26) of a numpy array or a
`__main__.QuantizedWeight8bit`. `_PickleReader` understands only the opcodes these files use, and
the only globals it resolves are inert stand-ins for numpy's array reconstruction, numpy dtypes
(incl. ml_dtypes.bfloat16) and QuantizedWeight8bit; anything else raises UnsafePickleError. The
big byte strings are not read while interpreting: the reader notes where they sit (`ArrayRef`),
so a file is checked before its data is read, and each tensor's bytes are read exactly once.
(pickle.Unpickler with an allow-list find_class would be as safe, but it reads each payload into
a bytes object first: a second copy of up to 3.2 GB per file, and no check before reading.)

Bounded work on any input: at most MAX_OPCODES opcodes, MAX_MEMO memo entries, MAX_ITEMS items
per container, MAX_DEPTH levels of nesting and MAX_INLINE_TOTAL bytes read while interpreting
(a release file needs 131, 40, 8, 4 and a few kB); values in messages are abbreviated by
reprlib, which never walks more of a structure than it shows (a tuple built from itself 40
times has 2^40 leaves). Only regular files are opened (a FIFO would block open() forever), and
every error names the file.
"""

from __future__ import annotations

import ctypes
import errno
import io
import itertools
import math
import mmap
import os
import pickletools
import reprlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from grok1.checkpoint.names import CheckpointError

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
MAX_OPCODES = 1024
MAX_MEMO = 256
MAX_ITEMS = 64
MAX_DEPTH = 16
MAX_INLINE_TOTAL = 1 << 20


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
        # nesting depth of each container built here, by id; the container is kept alive
        # beside its depth so that its id cannot be reused by another object meanwhile
        self.depths: dict[int, tuple[int, object]] = {}
        self.inline_bytes = 0

    def limit(self, what: str, value: int, most: int) -> None:
        if value > most:
            raise CheckpointError(f"{self.where}: {what} {value} exceeds {most}; release "
                                  f"checkpoint pickles are far smaller: not one of them")

    def container(self, items: list | tuple, kind: type = tuple) -> tuple | dict:
        """A new tuple of `items` (or an empty dict), its nesting depth recorded and bounded."""
        self.limit("container of", len(items), MAX_ITEMS)
        obj = kind(items)
        self.nest(obj, items)
        return obj

    def nest(self, obj: tuple | dict, items) -> None:
        """Record obj's depth: one more than its deepest item's (at least what it had)."""
        depth = 1 + max((self.depths.get(id(x), (0,))[0] for x in items), default=0)
        depth = max(depth, self.depths.get(id(obj), (0,))[0])
        self.limit("nesting depth", depth, MAX_DEPTH)
        self.depths[id(obj)] = (depth, obj)

    def read_inline(self, n: int) -> bytes:
        """n bytes read while interpreting (a string, small array data), counted and bounded."""
        self.inline_bytes += n
        self.limit("bytes read while interpreting", self.inline_bytes, MAX_INLINE_TOTAL)
        return self.read(n)

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
            return self.read_inline(n)
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
        for count in itertools.count(1):
            self.limit("opcode count", count, MAX_OPCODES)
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
                self.limit("memo size", len(memo), MAX_MEMO)
            elif op in (b"q", b"r"):  # BINPUT, LONG_BINPUT
                memo[self.unpack("<B" if op == b"q" else "<I")] = stack[-1]
                self.limit("memo size", len(memo), MAX_MEMO)
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
                stack.append(self.read_inline(n).decode("utf-8"))
            elif op in (b"C", b"B", b"\x8e"):  # SHORT_BINBYTES, BINBYTES, BINBYTES8
                n = self.unpack({b"C": "<B", b"B": "<I", b"\x8e": "<Q"}[op])
                stack.append(self.read_bytes(n))
            elif op == b")":
                stack.append(())
            elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
                n = op[0] - 0x84
                if len(stack) < n:
                    raise IndexError(f"TUPLE{n} on a stack of {len(stack)}")
                stack[-n:] = [self.container(stack[-n:])]
            elif op == b"t":
                stack.append(self.container(self.pop_mark()))
            elif op == b"}":
                stack.append(self.container([], dict))
            elif op in (b"s", b"u"):  # SETITEM, SETITEMS
                items = self.pop_mark() if op == b"u" else [stack.pop(-2), stack.pop()]
                target = stack[-1]
                if not isinstance(target, dict) or len(items) % 2:
                    raise CheckpointError(f"{self.where}: corrupt pickle (SETITEM at byte {pos})")
                for k, v in zip(items[::2], items[1::2], strict=True):
                    if not isinstance(k, str):
                        raise CheckpointError(f"{self.where}: dict key {_short(k)}; "
                                              f"expected str")
                    target[k] = v
                self.limit("container of", len(target), MAX_ITEMS)
                self.nest(target, items[1::2])
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
            raise self.refuse(f"asks for {_name(module)}.{_name(name)}")
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
            raise CheckpointError(f"{self.where}: array {shape} {dtype_name(ref.dtype)} needs "
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


_abbreviated = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_abbreviated.maxlevel, _abbreviated.maxstring, _abbreviated.maxother = 3, 40, 40
_abbreviated.maxtuple = _abbreviated.maxlist = _abbreviated.maxdict = 5


def _short(obj: object) -> str:
    """`obj` for a message: at most 5 items a level, 3 levels, 40 characters a leaf."""
    return _abbreviated.repr(obj)


def _name(part: object) -> str:
    """A global's module or name for a message: as is if a short printable string."""
    ok = isinstance(part, str) and part.isprintable() and len(part) <= 60
    return part if ok else _short(part)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | Path, where: str, buffering: int = -1) -> io.IOBase:
    """`path` opened for binary reading if it is a regular file; else CheckpointError naming
    `where`: missing, unreadable (a symlink loop, no permission), or not a regular file. It is
    opened without blocking and checked by fstat, so a FIFO cannot block open() forever and a
    file swapped after a check is still the file checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"{where} missing") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot open it: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            raise CheckpointError(f"{where} is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def scan_xai_file(path: str | Path, where: str | None = None) -> ArrayRef | QuantRef:
    """What one release file holds (shapes, dtypes, data offsets), reading only its small parts.

    Raises UnsafePickleError for anything but numpy arrays / QuantizedWeight8bit, and
    CheckpointError for a truncated or malformed file. `where` names the file in messages.
    """
    path = Path(path)
    where = where or path.name
    try:
        with open_regular(path, where) as f:
            return _PickleReader(f, os.fstat(f.fileno()).st_size, where).run()
    except OSError as e:  # a read failing (EIO) after the open
        raise CheckpointError(f"{where}: cannot read it: {e.strerror or e}") from e
    except (IndexError, TypeError, ValueError) as e:  # stack underflow, bad key, bad utf-8
        raise CheckpointError(f"{where}: corrupt pickle ({type(e).__name__}: {e})") from e


def read_array(f: io.RawIOBase | io.BufferedReader, ref: ArrayRef, where: str) -> torch.Tensor:
    """The CPU tensor behind `ref`, its bytes read from `f` straight into the tensor's memory."""
    t = torch.empty(ref.shape, dtype=ref.dtype)
    read_elements(f.fileno(), ref, where, t.view(-1))
    return t


def read_elements(fd: int, ref: ArrayRef, where: str, out: torch.Tensor, start: int = 0,
                  stop: int | None = None, staging: torch.Tensor | None = None) -> None:
    """Elements start:stop of the array `ref` (flat, in file order) read from the file `fd`
    into `out[start:stop]`, `out` a flat tensor of any dtype on any device.

    Straight into `out`'s memory when it is a CPU tensor of the stored dtype (one touch of
    that memory: the read itself); else through `staging` (a CPU uint8 tensor, at least the
    span's bytes), whose contents `out.copy_` converts and moves. pread, so threads can share
    `fd`; raises CheckpointError naming `where` when the file ends early."""
    stop = math.prod(ref.shape) if stop is None else stop
    if stop <= start:
        return
    itemsize = ref.dtype.itemsize
    nbytes = (stop - start) * itemsize
    direct = out.device.type == "cpu" and out.dtype == ref.dtype
    if direct:
        dst = out[start:stop]
    else:
        if staging is None or staging.numel() < nbytes:
            staging = torch.empty(nbytes, dtype=torch.uint8)
        dst = staging[:nbytes]
    view = memoryview((ctypes.c_char * nbytes).from_address(dst.data_ptr())).cast("B")
    if ref.data is not None:
        view[:] = ref.data[start * itemsize:stop * itemsize]
    else:
        offset, done = ref.offset + start * itemsize, 0
        while done < nbytes:  # a read may return less than asked (and caps at 2 GB on Linux)
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                raise CheckpointError(f"{where}: truncated: {_fmt_bytes(offset + done)} present, "
                                      f"{_fmt_bytes(ref.offset + ref.nbytes)} needed; fetch it "
                                      "again")
            done += n
    if not direct:
        out[start:stop].copy_(dst.view(ref.dtype))


def map_file(path: Path) -> mmap.mmap:
    """A private (copy-on-write) memory map of the whole file `path`: nothing is read until
    used, and writes to it never reach the file."""
    with open_regular(path, path.name) as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def array_in_map(mapped: mmap.mmap, ref: ArrayRef, where: str) -> torch.Tensor:
    """The tensor behind `ref` over the file's map `mapped` (it keeps the map alive); a file
    shorter than that (cut since its scan) is a CheckpointError naming `where`."""
    if ref.offset + ref.nbytes > len(mapped):
        raise CheckpointError(f"{where}: truncated: {_fmt_bytes(len(mapped))} present, "
                              f"{_fmt_bytes(ref.offset + ref.nbytes)} needed; fetch it again")
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=ref.nbytes, offset=ref.offset)
    return flat.view(ref.dtype).view(ref.shape)


def map_array(path: Path, ref: ArrayRef) -> torch.Tensor:
    """The CPU tensor behind `ref` as a private memory map of the file: nothing is read until
    used, so a slice of it reads only the pages it touches (per-rank sharded loading)."""
    if ref.data is not None or ref.nbytes == 0:
        with open_regular(path, path.name, buffering=0) as f:
            return read_array(f, ref, path.name)
    return array_in_map(map_file(path), ref, path.name)


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14


def populate(mapped: mmap.mmap, ref: ArrayRef, start: int, stop: int, where: str) -> bool:
    """Elements start:stop of `ref` in `mapped` read into the page cache and mapped, in the
    kernel (MADV_POPULATE_READ: one call, no fault per page; pages already cached are mapped
    without a copy). False where the kernel lacks it (before Linux 5.14): then pages are read
    on first use. Raises CheckpointError naming `where` when the file ends early."""
    itemsize = ref.dtype.itemsize
    begin = (ref.offset + start * itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
    end = ref.offset + stop * itemsize
    try:
        mapped.madvise(MADV_POPULATE_READ, begin, end - begin)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise CheckpointError(f"{where}: cannot read bytes {begin}:{end} ({e.strerror}); "
                              "truncated? fetch it again") from e
    return True


_MADV_POPULATE_WRITE = 23  # Linux 5.14
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


def _advise_pages(t: torch.Tensor, advice: int, *, outer: bool) -> None:
    """madvise(advice) over the pages of the contiguous CPU tensor `t`: every page it touches
    (`outer`), or only the whole pages inside it. A hint: errors (an older kernel) are ignored."""
    if _libc is None or t.device.type != "cpu" or not t.numel():
        return
    page = mmap.PAGESIZE
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    begin = first // page * page if outer else -(-first // page) * page
    end = -(-last // page) * page if outer else last // page * page
    if end > begin:
        _libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), ctypes.c_int(advice))


def prefault(t: torch.Tensor) -> None:
    """Fault in the pages of the contiguous CPU tensor `t` in one call (MADV_POPULATE_WRITE)
    before it is written: fresh memory handed out in the kernel's loop rather than a fault per
    page, 1.3-1.6x faster on a VM (bench/load_speed.py). Only a hint: a kernel without it
    (before Linux 5.14, or not Linux) faults the pages in on the first write instead. Never
    for a file's private map (it would copy the pages)."""
    _advise_pages(t, _MADV_POPULATE_WRITE, outer=False)


def populate_mapped(t: torch.Tensor) -> None:
    """Read the pages of `t`, a contiguous piece of a file's map, into the page cache and map
    them now (MADV_POPULATE_READ), so that a load reads what it keeps mapped. A hint: a file
    cut short shows at first use (SIGBUS), as for any mapped load."""
    _advise_pages(t, MADV_POPULATE_READ, outer=True)
