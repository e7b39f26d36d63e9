"""The release-checkpoint reader on adversarial files: bounded time and memory on any input, only
regular files opened, every error naming the file; then hypothesis-generated pickles, each of
which must be refused (CheckpointError) or loaded within a second and a few MB."""

import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grok1.checkpoint import CheckpointError
from grok1.checkpoint.xai_pickle_reader import ArrayRef, QuantRef, scan_xai_file

REPO = Path(__file__).resolve().parents[2]
GOLDEN_CKPT = Path(__file__).resolve().parents[3] / "shared" / "grok1" / "golden" / \
    "checkpoint" / "ckpt-0"

# the shape of a file that refers to itself: t = 1; then 40 times t = (t, t) via the memo
SELF_NESTED_40 = (b"\x80\x04K\x01" + b"".join(b"\x94h" + bytes([i]) + b"\x86" for i in range(40))
                  + b".")


def scan_in_child(path: Path, timeout_s: float = 30) -> dict:
    """scan_xai_file(path) in a fresh process (a regression here hangs or eats memory, which a
    test must not do to pytest): its outcome, seconds and peak RSS, or "timeout"."""
    code = f"""
import json, resource, sys, time
from grok1.checkpoint.xai_pickle_reader import scan_xai_file
t0 = time.perf_counter()
try:
    outcome = type(scan_xai_file(sys.argv[1], "the-file")).__name__
except Exception as e:
    outcome = f"{{type(e).__name__}}: {{e}}"
print(json.dumps({{"outcome": outcome, "seconds": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout"}
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_tuple_built_from_itself_40_times_is_refused_at_once_naming_the_file(tmp_path):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(SELF_NESTED_40)
    result = scan_in_child(path)
    assert result["outcome"].startswith("CheckpointError: the-file: nesting depth 17 exceeds 16")
    assert result["seconds"] < 1.0


def test_error_messages_abbreviate_nested_values_instead_of_repr(tmp_path):
    path = tmp_path / "tensor00000_000"  # 12 levels: within the depth limit, 4096 leaves
    path.write_bytes(b"\x80\x04K\x01" + b"".join(b"\x94h" + bytes([i]) + b"\x86"
                                                for i in range(12)) + b".")
    with pytest.raises(CheckpointError) as e:
        scan_xai_file(path, "the-file")
    assert str(e.value).startswith("the-file: holds ((((...), (...)), ((...), (...))),")
    assert len(str(e.value)) < 200


def test_100000_nested_tuples_give_an_error_naming_the_file_not_a_recursion_error(tmp_path):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(b"\x80\x04K\x01" + b"\x85" * 100_000 + b".")
    with pytest.raises(CheckpointError, match="^the-file: nesting depth 17 exceeds 16"):
        scan_xai_file(path, "the-file")


@pytest.mark.parametrize("payload, message", [
    (b"\x80\x04" + b"N" * 2000 + b".", "opcode count 1025 exceeds 1024"),
    (b"\x80\x04" + b"N\x94" * 300 + b".", "memo size 257 exceeds 256"),
    (b"\x80\x04(" + b"N" * 65 + b"t.", "container of 65 exceeds 64"),
    (b"\x80\x04" + (b"C\xff" + b"x" * 255) * 1100 + b".", "opcode count 1025 exceeds 1024"),
    (b"\x80\x04" + (b"B\x00\x10\x00\x00" + b"x" * 4096) * 300 + b".",
     "bytes read while interpreting 1052672 exceeds 1048576"),
])
def test_pickles_past_the_work_limits_are_refused_naming_the_file(tmp_path, payload, message):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=f"^the-file: {message}"):
        scan_xai_file(path, "the-file")


def test_a_fifo_named_like_a_tensor_file_is_refused_without_blocking(tmp_path):
    path = tmp_path / "tensor00000_000"
    os.mkfifo(path)
    try:
        result = scan_in_child(path, timeout_s=20)
    finally:  # a reader blocked in open() (the bug) is released by a writer opening the FIFO
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader left: nothing to release
    assert result["outcome"] == "CheckpointError: the-file is a FIFO, not a regular file"


def test_a_directory_or_a_symlink_loop_is_a_checkpoint_error_naming_the_file(tmp_path):
    folder = tmp_path / "tensor00000_000"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="^the-dir is a directory, not a regular file$"):
        scan_xai_file(folder, "the-dir")
    loop = tmp_path / "tensor00001_000"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match="^the-loop: cannot open it: Too many levels of "
                                              "symbolic links$"):
        scan_xai_file(loop, "the-loop")


# ---- fuzzing: hypothesis-generated pickles ------------------------------------------------------

def _short_string(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


_NAMES = ["numpy", "numpy.core.multiarray", "numpy._core.multiarray", "_reconstruct", "ndarray",
          "dtype", "ml_dtypes", "bfloat16", "__main__", "QuantizedWeight8bit", "f4", "i1", "f2",
          "weight", "scales", "b", "<", ">", "|", "builtins", "eval", "posix", "system"]
_OPS = st.one_of(
    st.sampled_from([b"(", b")", b"\x85", b"\x86", b"\x87", b"t", b"}", b"s", b"u", b"\x94",
                     b"N", b"\x88", b"\x89", b"\x93", b"R", b"\x81", b"b", b".", b"\x80\x04",
                     b"0", b"2", b"]", b"a", b"e", b"l", b"Q", b"c"]),
    st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
    st.integers(0, 8).map(lambda i: b"h" + bytes([i])),
    st.integers(0, 300).map(lambda i: b"r" + struct.pack("<I", i)),
    st.integers(-2**31, 2**31 - 1).map(lambda i: b"J" + struct.pack("<i", i)),
    st.sampled_from(_NAMES).map(_short_string),
    st.binary(max_size=40).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.integers(0, 1 << 40).map(lambda n: b"B" + struct.pack("<I", min(n, 2**32 - 1))),
    st.integers(0, 1 << 62).map(lambda n: b"\x8e" + struct.pack("<Q", n)),
    st.binary(min_size=1, max_size=8),
)
# a short block of opcodes, repeated up to 20,000 times: nesting, memo and op-count attacks
_REPEATED = st.tuples(st.lists(_OPS, min_size=1, max_size=6), st.integers(1, 20_000)).map(
    lambda t: b"".join(t[0]) * t[1])


def _array_pickle(shape: tuple[int, ...], dtype: str) -> bytes:
    return pickle.dumps(np.zeros(shape, dtype=dtype), protocol=4)


_VALID = st.builds(_array_pickle, st.lists(st.integers(0, 9), max_size=3).map(tuple),
                   st.sampled_from(["f4", "f2", "i1", "i8", "u1", "f8"]))


@st.composite
def _mutated(draw, source: st.SearchStrategy[bytes]) -> bytes:
    """A pickle with a few bytes flipped, inserted or deleted in its first 300 bytes."""
    data = bytearray(draw(source))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(0, min(len(data), 300) - 1)))
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=6))
        elif data:
            del data[i]
    return bytes(data)


def _golden_files() -> list[bytes]:
    if not GOLDEN_CKPT.exists():
        return [_array_pickle((3, 4), "f4")]
    return [(GOLDEN_CKPT / f"tensor{i:05d}_000").read_bytes() for i in (2, 5, 11)]


PICKLES = st.one_of(
    st.lists(_OPS, max_size=120).map(lambda ops: b"\x80\x04" + b"".join(ops) + b"."),
    _REPEATED.map(lambda body: b"\x80\x04" + body + b"."),
    _VALID,
    _mutated(_VALID),
    _mutated(st.sampled_from(_golden_files())),
)
FUZZ_EXAMPLES = 2500
MAX_FUZZ_BYTES = 4 << 20  # Python allocations while scanning one file (tracemalloc's peak)
outcomes: collections.Counter = collections.Counter()


def test_generated_pickles_are_each_refused_or_loaded_within_a_second_and_a_few_mb(tmp_path,
                                                                                  capsys):
    path = tmp_path / "tensor00000_000"
    slowest = {"seconds": 0.0, "bytes": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=1000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(PICKLES)
    def scan(data: bytes) -> None:
        path.write_bytes(data)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        try:
            ref = scan_xai_file(path, "the-file")
            assert isinstance(ref, (ArrayRef, QuantRef))
            outcomes["loaded"] += 1
        except CheckpointError as e:
            assert str(e).startswith("the-file"), e  # every refusal names the file
            assert len(str(e)) < 400, e
            outcomes[type(e).__name__] += 1
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - before
        slowest["seconds"], slowest["bytes"] = (max(slowest["seconds"], seconds),
                                                max(slowest["bytes"], peak))
        assert seconds < 1.0 and peak < MAX_FUZZ_BYTES, (seconds, peak)

    tracemalloc.start()
    try:
        scan()
    finally:
        tracemalloc.stop()
    with capsys.disabled():
        print(f"\npickle fuzz: {sum(outcomes.values())} files, {dict(outcomes)}, 0 hangs, "
              f"slowest {slowest['seconds'] * 1e3:.1f} ms, peak {slowest['bytes'] / 1e6:.2f} MB")
    assert sum(outcomes.values()) >= FUZZ_EXAMPLES
    assert outcomes["loaded"] > 0 and outcomes["CheckpointError"] > 0
    assert outcomes["UnsafePickleError"] > 0
