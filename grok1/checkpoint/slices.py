"""What a rank asks a checkpoint reader for: a declarative slice of one logical tensor.

A reader's `read(path, config, want)` yields `(name, tensor)` for each entry of `want`; a
`TensorSlice(name, dim, start, stop)` asks for `full[name]` narrowed to `start:stop` along `dim`
of the tensor in grok1's layout (matrices [(E,) in, out], the layout model.py holds), `dim=None`
for the whole tensor. One dim per request is all tensor and expert parallelism need (a column-
or row-parallel matrix, a range of experts, a range of expert width); the reader maps it to the
files' own layout and reads only those bytes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from grok1.config import GrokConfig
from grok1.sharding import Layout, head_split, plan


@dataclasses.dataclass(frozen=True)
class TensorSlice:
    name: str  # grok1 state-dict key, e.g. "layers.3.moe.w_up.weight"
    dim: int | None = None  # None: the whole tensor
    start: int = 0
    stop: int | None = None  # None: to the end of dim

    def bounds(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(dim, start, stop) checked against the full `shape`, or None for the whole tensor.
        Raises ValueError for a dim or range outside it."""
        if self.dim is None:
            return None
        if not -len(shape) <= self.dim < len(shape):
            raise ValueError(f"{self.name}: dim {self.dim} out of range for shape {shape}")
        dim = self.dim % len(shape)
        stop = shape[dim] if self.stop is None else self.stop
        if not 0 <= self.start < stop <= shape[dim]:
            raise ValueError(f"{self.name}: range {self.start}:{stop} is not a non-empty range "
                             f"of dim {dim} (size {shape[dim]})")
        return dim, self.start, stop

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this slice of a tensor of `shape` has."""
        b = self.bounds(shape)
        if b is None:
            return tuple(shape)
        dim, start, stop = b
        return tuple(stop - start if d == dim else n for d, n in enumerate(shape))


def normalize_want(want: Iterable[TensorSlice | str] | None,
                   shapes: dict[str, tuple[int, ...]]) -> list[TensorSlice]:
    """`want` as TensorSlices (a bare name = the whole tensor; None = every tensor of `shapes`,
    in its order), each checked against `shapes`. Raises ValueError for an unknown name."""
    if want is None:
        return [TensorSlice(name) for name in shapes]
    out = []
    for w in want:
        s = TensorSlice(w) if isinstance(w, str) else w
        if s.name not in shapes:
            raise ValueError(f"{s.name!r} is not a tensor of this checkpoint; known names look "
                             f"like {', '.join(list(shapes)[:3])}")
        s.bounds(shapes[s.name])
        out.append(s)
    return out


_LAYER_MATRIX = re.compile(r"layers\.\d+\.(.+)\.(weight|scales)")


def layout_want(config: GrokConfig, layout: Layout,
                shapes: dict[str, tuple[int, ...]]) -> list[TensorSlice]:
    """What `layout.rank` reads of each tensor in `shapes` (grok1 names, grok1's layout): the
    slices of grok1.sharding's plan (and an untied head's `head_split`), every other tensor
    whole. For a reader's `want`, so that a rank reads only its bytes. Dense matrices only:
    ValueError for quantization scales (their groups split otherwise, parallel.tensor), and
    ConfigError (sharding) when the layout does not split the model."""
    table, head = plan(config, layout), head_split(config, layout)
    out = []
    for name, shape in shapes.items():
        m = _LAYER_MATRIX.fullmatch(name)
        split = table.get(m.group(1)) if m else head if name == "lm_head.weight" else None
        if split is not None and m is not None and m.group(2) == "scales":
            raise ValueError(f"{name}: layout_want slices dense matrices only")
        if split is None or split.stop - split.start == shape[split.weight_dim]:
            out.append(TensorSlice(name))
        else:
            out.append(TensorSlice(name, split.weight_dim % len(shape), split.start, split.stop))
    return out
