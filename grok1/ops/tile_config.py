"""The Triton kernels' launch configs: one frozen dataclass per kernel family, read from the
tuning tables in configs/*.json and validated when a table is first read.

A table chooses tile shapes and instructions, never numerics: what a kernel computes is a named
argument at its call (`fused_moe(exact_int8_products=...)`), which no table can set. Every file
has one layout:

    {device: {"<family>_<shape>": {"<rows>": {KEY: value, ...}}}}

- device: a GPU's exact name ("NVIDIA_H100_80GB_HBM3") or its architecture ("sm_90"); the exact
  name's entries override the architecture's (`device_name` gives "name|sm_XY").
- family and shape: "mm_K6144_N6144" (`LinearTiles`), "gemv_K6144_N6144_1024_1024" (`GemvTiles`,
  one launch over matrices of widths 6144, 1024, 1024), "moe_D6144_F32768_E8_int8" (`MoeTiles`).
- rows: the rows the entry was tuned at (tokens; the MoE's (token, expert) pairs); a launch takes
  the entry nearest its own (vLLM's rule).
- KEY: the family's field names below; an entry lists the keys it changes from the defaults.

A bad entry raises ConfigError naming the file, the entry, the key and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, TypeVar

from grok1.config import ConfigError
from grok1.ops._triton import NUM_SMS_GUESS

CONFIG_DIR = Path(__file__).parent / "configs"
LAYOUT = "the layout: {device: {family_shape: {rows: {KEY: value}}}}"

# Which instructions compute the reference's bf16(w * s) in the GEMVs (dot_triton.dequant_f32:
# 0-3, the same values whichever; 2 measured fastest, bench/dequant_modes.py).
DEQUANT_DEFAULT = 2


def _key(default: int, *, pow2: bool = False, minimum: int = 1,
         choices: tuple[int, ...] | None = None) -> Any:
    """A config key: an int with its default and what a valid value is. pow2: a block size
    (tl.arange needs a power of two) or a warp count (Triton's num_warps likewise)."""
    return dataclasses.field(default=default, metadata={"pow2": pow2, "minimum": minimum,
                                                        "choices": choices})


T = TypeVar("T", bound="_Tiles")


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """Validation and conversion shared by the families (not used on its own)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check(type(self).__name__, field.name, getattr(self, field.name), field.metadata)

    @classmethod
    def from_dict(cls: type[T], entry: dict, where: str, base: T | None = None) -> T:
        """`entry`'s keys over `base` (default: the family's defaults), validated; `where` names
        the entry in errors (a file path, then "sm_90/moe_D6144_F32768_E8_int8/2")."""
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object of {cls.__name__} keys, found "
                              f"{entry!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in entry.items():
            field = fields.get(key)
            if field is None:
                raise ConfigError(f"{where}: unknown key {key!r}={value!r} for {cls.__name__} "
                                  f"(known: {', '.join(fields)})")
            _check(where, key, value, field.metadata)
        return dataclasses.replace(base or cls(), **entry)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _check(where: str, key: str, value: Any, rule: dict) -> None:
    if type(value) is not int:  # bool is an int subclass; JSON true is not a tile size
        raise ConfigError(f"{where}: {key}={value!r} must be an integer")
    if rule["choices"] is not None and value not in rule["choices"]:
        raise ConfigError(f"{where}: {key}={value} must be one of {list(rule['choices'])}")
    if value < rule["minimum"]:
        raise ConfigError(f"{where}: {key}={value} must be >= {rule['minimum']}")
    if rule["pow2"] and value & (value - 1):
        raise ConfigError(f"{where}: {key}={value} must be a power of two")


@dataclasses.dataclass(frozen=True)
class LinearTiles(_Tiles):
    """quant_linear (ops/linear_triton.linear_kernel), M > 1: BM x BN output tiles over BK-deep
    K tiles, K split SPLIT ways (f32 partial sums); W warps, S pipeline stages."""
    BM: int = _key(128, pow2=True)
    BN: int = _key(128, pow2=True)
    BK: int = _key(64, pow2=True)
    SPLIT: int = _key(1)
    W: int = _key(8, pow2=True)
    S: int = _key(4)


@dataclasses.dataclass(frozen=True)
class GemvTiles(_Tiles):
    """quant_gemv (ops/linear_triton.gemv3_kernel), one row x up to three matrices: BN columns
    by BK rows per step; about PROGRAMS (column tile, K split) programs, the K split following;
    W warps, S pipeline stages; DEQUANT the dequantization's instructions (same values); MMA 1
    the products on the tensor cores (the same weights bf16(w * s) and f32 sums, an instruction
    choice like MoeTiles.GMMA; BK >= 16; DEQUANT then has no effect)."""
    BN: int = _key(128, pow2=True)
    BK: int = _key(32, pow2=True)
    W: int = _key(4, pow2=True)
    S: int = _key(3)
    PROGRAMS: int = _key(4 * NUM_SMS_GUESS)
    DEQUANT: int = _key(DEQUANT_DEFAULT, minimum=0, choices=(0, 1, 2, 3))
    MMA: int = _key(0, minimum=0, choices=(0, 1))


@dataclasses.dataclass(frozen=True)
class MoeTiles(_Tiles):
    """fused_moe (ops/moe_triton): two paths, picked by the pair count P.

    P <= GEMV: the GEMV kernels, one program row per pair: gate/up GBN1 x GBK1 tiles, GW1 warps,
    GS1 stages, its K range split GSPLIT1 ways (then a combine kernel); down GBN2 x GBK2, GW2,
    GS2, K split GSPLIT ways; DEQUANT as GemvTiles'; GMMA 1 runs them on the tensor cores (each
    pair's x padded to 16 rows against the dequantized tile, moe_mma_gemv_*: the same weights
    bf16(w * s) and f32 sums, an instruction choice; DEQUANT then has no effect). Otherwise the grouped GEMMs over pairs
    sorted by expert: BM pairs per block; gate/up BN1 x BK1 tiles, W1 warps, S1 stages; down
    BN2 x BK2, W2, S2, its K range split SPLIT ways. MAGIC: the int8 -> f32 conversion through
    the float bit pattern instead of the conversion unit (dot_triton.i8_to_f32; exact either way,
    so an instruction choice, not numerics); only the down GEMM of the opt-in exact-products
    path converts int8 values on their own, so elsewhere it has no effect. I4PAIR (int4 weights'
    grouped GEMMs; same values either way): 1 loads each byte once and multiplies its two
    nibbles' tiles by x's even and odd rows (two MMAs of BK / 2 rows; BK >= 32), 0 loads the
    tile row by row (each byte twice, one MMA of BK): 1 pays at decode's few pairs per expert,
    0 at prefill's, where the strided x loads stall the pipeline (bench/NOTES.md).
    The defaults are the decode tiles (P <= 64) without the GEMV path."""
    GEMV: int = _key(0, minimum=0)
    BM: int = _key(16, pow2=True)
    BN1: int = _key(64, pow2=True)
    BK1: int = _key(128, pow2=True)
    W1: int = _key(4, pow2=True)
    S1: int = _key(4)
    BN2: int = _key(64, pow2=True)
    BK2: int = _key(128, pow2=True)
    W2: int = _key(4, pow2=True)
    S2: int = _key(4)
    SPLIT: int = _key(4)
    MAGIC: int = _key(0, minimum=0, choices=(0, 1))
    GBN1: int = _key(128, pow2=True)
    GBK1: int = _key(32, pow2=True)
    GW1: int = _key(4, pow2=True)
    GSPLIT1: int = _key(1)
    GS1: int = _key(3)
    GBN2: int = _key(128, pow2=True)
    GBK2: int = _key(32, pow2=True)
    GW2: int = _key(4, pow2=True)
    GSPLIT: int = _key(8)
    GS2: int = _key(3)
    DEQUANT: int = _key(DEQUANT_DEFAULT, minimum=0, choices=(0, 1, 2, 3))
    GMMA: int = _key(0, minimum=0, choices=(0, 1))
    I4PAIR: int = _key(1, minimum=0, choices=(0, 1))


FAMILIES: dict[str, type[_Tiles]] = {"mm": LinearTiles, "gemv": GemvTiles, "moe": MoeTiles}


def mm_key(K: int, N: int) -> str:
    return f"mm_K{K}_N{N}"


def gemv_key(K: int, Ns: list[int]) -> str:
    """One launch over matrices [K, N_i] sharing x: "gemv_K6144_N6144_1024_1024" (q/k/v)."""
    return f"gemv_K{K}_N{'_'.join(map(str, Ns))}"


def moe_key(D: int, F: int, E: int, dtype: str) -> str:
    return f"moe_D{D}_F{F}_E{E}_{dtype}"


@functools.cache
def load_table(path: Path) -> dict[str, dict[str, dict[int, _Tiles]]]:
    """A tuning file, every entry validated: {device: {family_shape: {rows: tiles}}}; {} when
    the file does not exist."""
    if not path.exists():
        return {}
    where = str(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e})") from e
    table: dict[str, dict[str, dict[int, _Tiles]]] = {}
    for device, entries in _object(raw, where).items():
        for shape, by_rows in _object(entries, f"{where}: {device}").items():
            family = FAMILIES.get(shape.split("_", 1)[0])
            if family is None:
                raise ConfigError(f"{where}: {device}/{shape}: unknown kernel family (the key "
                                  f"starts with one of {', '.join(FAMILIES)})")
            rows_table = table.setdefault(device, {}).setdefault(shape, {})
            for rows, entry in _object(by_rows, f"{where}: {device}/{shape}").items():
                at = f"{where}: {device}/{shape}/{rows}"
                if not rows.isdigit() or int(rows) < 1:
                    raise ConfigError(f"{at}: the rows key must be a positive integer ({LAYOUT})")
                rows_table[int(rows)] = family.from_dict(entry, at)
    return table


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {value!r}")
    return value


def tuned(op: str, device: str) -> dict[str, dict[int, _Tiles]]:
    """The tuned entries of configs/<op>.json for a device, {family_shape: {rows: tiles}}: the
    architecture's (e.g. "sm_90"), where the exact name has a shape, its rows table instead."""
    table = load_table(CONFIG_DIR / f"{op}.json")
    merged: dict = {}
    for key in reversed(device.split("|")):
        merged |= table.get(key, {})
    return merged


def nearest_rows(by_rows: dict[int, T], rows: int) -> T | None:
    """The entry tuned at the row count nearest `rows` (vLLM's rule; the first listed on a
    tie), or None for an empty table."""
    if not by_rows:
        return None
    return by_rows[min(by_rows, key=lambda r: abs(r - rows))]
