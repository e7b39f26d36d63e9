"""Release-format pickles for tests: an independent reader (numpy + ml_dtypes through pickle) and
a writer of files as xai-org/grok-1's checkpoint.py writes them. Test code only: the reader
unpickles, which is safe only on the trusted golden files."""

from __future__ import annotations

import contextlib
import pickle
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import torch


class QuantizedWeight8bit:
    """The reference's pytree dataclass, as far as pickle sees it: `weight` and `scales`."""

    def __init__(self, weight: np.ndarray, scales: np.ndarray):
        self.weight, self.scales = weight, scales


class _Reader(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("__main__", "QuantizedWeight8bit"):
            return QuantizedWeight8bit  # no sys.modules["__main__"] shim needed to read
        return super().find_class(module, name)


def read_xai_file(path: Path) -> np.ndarray | QuantizedWeight8bit:
    with open(path, "rb") as f:
        return _Reader(f).load()


@contextlib.contextmanager
def _as_main_attribute(cls: type):
    """pickle writes a class by name and checks the name resolves to it; the reference put its
    class on __main__ (checkpoint.py), so for the duration of a dump, so do we."""
    main = sys.modules["__main__"]
    had, old = hasattr(main, cls.__name__), getattr(main, cls.__name__, None)
    cls.__module__ = "__main__"
    setattr(main, cls.__name__, cls)
    try:
        yield
    finally:
        cls.__module__ = __name__
        if had:
            setattr(main, cls.__name__, old)
        else:
            delattr(main, cls.__name__)


def write_xai_file(path: Path, value: np.ndarray | QuantizedWeight8bit) -> None:
    """One release file: a pickle (protocol 4) of an array or a QuantizedWeight8bit."""
    with _as_main_attribute(QuantizedWeight8bit), open(path, "wb") as f:
        pickle.dump(value, f, protocol=4)


def to_torch(a: np.ndarray) -> torch.Tensor:
    """numpy (incl. ml_dtypes.bfloat16) -> torch, bit for bit."""
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def write_release_checkpoint(folder: Path, config, seed: int = 0) -> Path:
    """A release checkpoint for `config` (a GrokConfig) in folder/ckpt-0, its config beside
    it: random int8 weights, small positive bf16 scales, f32 normal tensors, each file written
    as the reference writes it. Returns the ckpt-0 folder."""
    from grok1.checkpoint.names import xai_file_name, xai_parameter_order
    from grok1.checkpoint.xai_pickle import release_specs

    specs = release_specs(config)
    rng = np.random.default_rng(seed)
    ckpt = folder / "ckpt-0"
    ckpt.mkdir(parents=True, exist_ok=True)
    for entry in xai_parameter_order(config.num_layers):
        name = entry.grok1_name
        if name + ".weight" in specs:
            shape = specs[name + ".weight"][0]
            weight = np.frombuffer(rng.bytes(int(np.prod(shape))), np.int8).reshape(shape)
            scales = rng.random(specs[name + ".scales"][0], np.float32) * 1e-3
            value = QuantizedWeight8bit(weight, scales.astype(ml_dtypes.bfloat16))
        else:
            value = rng.standard_normal(specs[name][0], np.float32)
        write_xai_file(ckpt / xai_file_name(entry.file_index), value)
        del value  # one file's arrays at a time
    config.save_json(folder / "config.json")
    return ckpt
