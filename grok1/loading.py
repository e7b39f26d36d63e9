"""The one way to build a model: `load` reads weights from a checkpoint, `random_weights` makes
them up (benchmarks, tests). Both build the model on the meta device with this rank's shapes,
fill it tensor by tensor and, given a mesh, add the collectives (parallel.tensor.parallelize):

    model = grok1.load("checkpoints", device="cuda")                   # one process
    mesh = init_distributed(tp=8)                                      # under torchrun
    model = grok1.load("checkpoints", mesh=mesh, moe="tp")             # this rank's slices
    model = grok1.random_weights(GrokConfig.preset("grok-1").replace(num_layers=4), device="cuda")

A source is recognised by FORMATS, a table of (name, what it looks like, detect, read): a new
format is one more entry and no caller changes. A reader gets a ReadRequest: the caller's config
(or None: the source's own), device, dtype, and the rank's place as two helpers, `empty_model`
(meta, the rank's shapes) and `shard_fn` (the stored tensor -> the rank's piece, a view, so a
memory-mapped file is read only where the piece lies). Sharded, a rank's tensors are exactly the
slices of the one-process model (parallel.tensor.plan is the one table of who holds what).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from grok1.checkpoint.names import CheckpointError, ShardFn, assign_tensor
from grok1.checkpoint import grok2, hf
from grok1.checkpoint.slices import layout_want
from grok1.checkpoint.convert import (
    INDEX_FILE,
    is_sharded_native,
    load_sharded_native,
    sharded_family,
    sharded_format,
)
from grok1.checkpoint.native import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    load_native,
    native_config,
)
from grok1.checkpoint.xai_pickle import find_ckpt0, load_xai_checkpoint
from grok1.config import ConfigError, GrokConfig, read_config_json
from grok1.config_grok2 import Grok2Config
from grok1.model import BF16, Grok1
from grok1.quant import INT8, WeightFormat, weight_format
from grok1.tokenizer import Tokenizer, find_tokenizer
from grok1.tokenizer_grok2 import TOKENIZER_FILE as GROK2_TOKENIZER_FILE
from grok1.tokenizer_grok2 import Grok2Tokenizer
from grok1.parallel.mesh import Mesh
from grok1.parallel.tensor import (
    Layout,
    head_split,
    parallelize,
    plan,
    shard_model_,
    slice_scales,
    slice_weight,
)

__all__ = ["FAMILIES", "FORMATS", "Family", "Format", "ReadRequest", "detect_format", "load",
           "load_tokenizer", "model_family", "random_weights", "rank_layout", "rank_slicer"]


# ---- this rank's place ---------------------------------------------------------------------------

def rank_layout(mesh: Mesh | None, layout: Layout | None = None, *, moe: str = "tp",
                unembed: str = "vocab") -> Layout | None:
    """The layout a rank loads: `layout` if given, else the mesh's tp axis split as `moe` and
    `unembed` say (attention by heads), else None (the whole model)."""
    if layout is not None or mesh is None:
        return layout
    return Layout(mesh.tp_size, mesh.tp_rank, moe=moe, unembed=unembed)


_MATRIX_KEY = re.compile(r"layers\.\d+\.(.+)\.(weight|scales)")


def rank_slicer(config: GrokConfig, layout: Layout,
                weights: WeightFormat | None = None) -> ShardFn:
    """shard_fn(state-dict key, stored tensor) -> `layout.rank`'s piece, a view, cut by
    parallel.tensor.plan (the table `shard_model_` cuts a loaded model by). Quantized matrices
    split along their input dim take their scale groups with them (8 groups over 2 ranks: 4
    each); `weights` is the matrices' stored format when not the release's int8 (int4: packed
    rows in pairs, groups of group_size inputs; fp8: one scale per column, kept whole on a row
    split); an untied lm_head is cut by head_split; the embedding, norms and routers are whole
    on every rank. The pieces raise ConfigError naming the tensor when the split would cut an
    int4 byte or scale group."""
    table, head = plan(config, layout), head_split(config, layout)
    with torch.device("meta"):  # the stored matrices' input dims, for the scale groups
        d_in = {k: v.shape[-2] for k, v in Grok1(config, quantized=True).state_dict().items()
                if k.endswith(".weight")}

    def shard_fn(key: str, t: torch.Tensor) -> torch.Tensor:
        if key == "lm_head.weight" and head is not None:  # an untied head (Grok-2's)
            return slice_weight(t, head)
        m = _MATRIX_KEY.fullmatch(key)
        if m is None or m.group(1) not in table:
            return t
        split = table[m.group(1)]
        if m.group(2) == "weight":
            return slice_weight(t, split, weights, key)
        return slice_scales(t, split, d_in[key.removesuffix("scales") + "weight"], key, weights)

    return shard_fn


@dataclasses.dataclass(frozen=True)
class ReadRequest:
    """What a format's reader is asked for."""
    config: GrokConfig | Grok2Config | None  # the caller's; None: the source's own (or default)
    device: torch.device
    dtype: torch.dtype | None  # of the embedding and dense matrices; None: the format's default
    layout: Layout | None  # this rank's place; None: the whole model
    progress: bool  # show a progress bar (one rank of several shows it)

    def empty_model(self, config: GrokConfig, weights: bool | str | WeightFormat | None,
                    dtype: torch.dtype, compute_dtype: torch.dtype = BF16) -> Grok1:
        """The model to fill: on the meta device, with this rank's shapes. `weights`: the
        matrices' format (True: the release's int8; False or None: dense)."""
        with torch.device("meta"):
            model = Grok1(config, quantized=weights is True,
                          weights=None if isinstance(weights, bool) else weights, dtype=dtype,
                          compute_dtype=compute_dtype)
        return model if self.layout is None else shard_model_(model, self.layout)

    def shard_fn(self, config: GrokConfig,
                 weights: WeightFormat | None = None) -> ShardFn | None:
        """The stored tensor -> this rank's piece (matrices stored in `weights`, default the
        release's int8); None for the whole model."""
        return None if self.layout is None else rank_slicer(config, self.layout, weights)


# ---- formats -------------------------------------------------------------------------------------

def _read_release(path: Path, req: ReadRequest) -> Grok1:
    config = req.config or GrokConfig.preset("grok-1")  # the release ships no config
    dtype = req.dtype or BF16  # the reference casts the f32 embedding to bf16 before use
    return load_xai_checkpoint(path, config, device=req.device, dtype=dtype,
                               model=req.empty_model(config, True, dtype),
                               shard_fn=req.shard_fn(config), progress=req.progress,
                               # the ranks of a node share its disks: 4 reader threads each
                               workers=8 if req.layout is None else 4)


def _read_native(path: Path, req: ReadRequest) -> Grok1:
    config = req.config or native_config(path)
    return load_native(path, config, device=req.device, dtype=req.dtype,
                       build=req.empty_model if req.layout else None,
                       shard_fn=req.shard_fn(config))


def _read_sharded_native(path: Path, req: ReadRequest) -> Grok1:
    config = req.config or GrokConfig.from_json(path / CONFIG_FILE)
    weights = sharded_format(path)  # int8, int4 (packed, grouped) or fp8: sliced as stored
    return load_sharded_native(path, config, device=req.device, dtype=req.dtype,
                               build=req.empty_model if req.layout else None,
                               shard_fn=req.shard_fn(config, weights))


def _read_hf(path: Path, req: ReadRequest) -> Grok1:
    """A Hugging Face Grok-1 port: its bf16 matrices as they are (`grok1 convert` quantizes)."""
    config = req.config or hf.config_from_hf(read_config_json(path / CONFIG_FILE),
                                             source=f"{path.name}/{CONFIG_FILE}")
    dtype = req.dtype or BF16
    model = req.empty_model(config, False, dtype)
    shard_fn = req.shard_fn(config)
    targets = model.state_dict(keep_vars=True)
    for key, t in hf.read(path, config):
        t = shard_fn(key, t) if shard_fn else t
        assign_tensor(model, key, t.to(device=req.device, dtype=targets[key].dtype))
    return model


def _read_grok2(path: Path, req: ReadRequest) -> Grok1:
    if req.config is not None and not isinstance(req.config, Grok2Config):
        raise ConfigError(f"{path}: a Grok-2 folder takes its own config.json (or a "
                          f"Grok2Config), not {type(req.config).__name__}")
    config = req.config or Grok2Config.from_json(path / CONFIG_FILE)
    # dtype: the compute dtype, bf16 (SGLang's storage points) or float32 (the golden check);
    # the weights stay the files' bf16
    dtype = req.dtype or BF16
    if req.layout is None:
        return grok2.load_grok2(path, config, device=req.device, dtype=dtype)
    # a rank reads only its slices of the pre-sharded files (concatenating or re-splitting
    # the release's 8 expert pre-shards as its width range needs)
    grok_config = config.to_grok_config()
    return grok2.load_grok2(path, config, device=req.device, dtype=dtype,
                            model=req.empty_model(grok_config, False, BF16, dtype),
                            want=layout_want(grok_config, req.layout,
                                             grok2.grok1_shapes(config)))


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    looks_like: str  # for the error that names what a folder should hold
    detect: Callable[[Path], bool]  # cheap: file names only, no tensor data
    read: Callable[[Path, ReadRequest], Grok1]  # the filled model, sharded per request.layout
    # the model family a folder holds (FAMILIES: its tokenizer and chat template)
    family: Callable[[Path], str] = lambda _path: "grok-1"


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family's text goes through: its tokenizer file in (or beside) the
    checkpoint folder, the class reading it (load_tokenizer), and the server's chat template
    (a name in grok1.server.serving.CHAT_TEMPLATES)."""
    tokenizer_file: str
    tokenizer_class: Callable[[Path], Tokenizer | Grok2Tokenizer]
    chat_template: str


FAMILIES: dict[str, Family] = {
    "grok-1": Family(TOKENIZER_FILE, Tokenizer, "transcript"),
    "grok-2": Family(GROK2_TOKENIZER_FILE, Grok2Tokenizer, "grok-2"),
}


# The first whose detect claims a folder reads it: specific formats before general ones.
FORMATS: tuple[Format, ...] = (
    Format("grok1", f"a grok1 folder ({WEIGHTS_FILE} + config.json)",
           lambda path: (path / WEIGHTS_FILE).is_file(), _read_native),
    # a port's index.json looks like a converted folder's: its tensor names decide first
    Format("hf-grok1", "a Hugging Face Grok-1 port (hpcai-tech/grok-1 or keyfan/grok-1-hf)",
           hf.detect, _read_hf),
    Format("grok1-sharded", f"a converted grok1 folder ({INDEX_FILE} + model-*.safetensors)",
           is_sharded_native, _read_sharded_native, family=sharded_family),  # in its index
    Format("grok2", "a Grok-2 release folder (pytorch_model-*-TP-common.safetensors)",
           grok2.detect, _read_grok2, family=lambda _path: "grok-2"),
    Format("xai-release", "a release checkpoint (ckpt-0/tensorNNNNN_000, or that folder)",
           lambda path: find_ckpt0(path) is not None, _read_release),
)


def detect_format(path: str | Path) -> Format:
    """The format of the checkpoint folder `path`; CheckpointError naming it when none fits."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder; expected {_expected()}")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    raise CheckpointError(f"{path}: not a checkpoint grok1 reads; expected {_expected()}")


def model_family(source: str | Path) -> Family:
    """The family of the model in the checkpoint folder `source` (its format says, or a
    converted folder's index); CheckpointError for a folder no format claims."""
    path = Path(source)
    return FAMILIES[detect_format(path).family(path)]


def load_tokenizer(source: str | Path, tokenizer: str | Path | None = None
                   ) -> Tokenizer | Grok2Tokenizer:
    """The tokenizer of the checkpoint folder `source`, read by its family's class (Grok-2's
    tiktoken file, else SentencePiece): the file `tokenizer` if given, else the family's file
    in the folder or beside it. Raises CheckpointError for a folder no format claims,
    TokenizerError for a missing or unreadable file."""
    family = model_family(source)
    return family.tokenizer_class(find_tokenizer(tokenizer, Path(source), family.tokenizer_file))


def _expected() -> str:
    *head, last = [fmt.looks_like for fmt in FORMATS]
    return f"{', '.join(head)} or {last}" if head else last


def _place(device: torch.device | str | None, mesh: Mesh | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return mesh.device if mesh is not None else torch.device("cpu")


def _finish(model: Grok1, mesh: Mesh | None, layout: Layout | None) -> Grok1:
    if mesh is not None:
        model = parallelize(model, mesh.tp_group, layout)
    return model.eval().requires_grad_(False)


# ---- the front door ------------------------------------------------------------------------------

def load(source: str | Path, *, config: GrokConfig | Grok2Config | str | Path | None = None,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         mesh: Mesh | None = None, layout: Layout | None = None, moe: str = "tp",
         unembed: str = "vocab", progress: bool = True) -> Grok1:
    """The Grok1 in the checkpoint folder `source`, in eval mode with gradients off.

    `source` is a folder holding the release's ckpt-0/ (or ckpt-0 itself), or a grok1 folder
    (model.safetensors + config.json); FORMATS lists what is recognised. `config`: a GrokConfig,
    a preset name or a JSON file (GrokConfig.resolve), or None for the source's own (the grok-1
    preset for the release). `dtype`: of the embedding and dense matrices (default bf16 for the
    release, as saved for a grok1 folder); the release's int8 matrices stay int8 with their
    bf16 scales. A Grok-2 release folder (its own config.json, or a Grok2Config) loads whole
    or per rank, and there `dtype` is the compute dtype: bf16 (SGLang's rounding points) or
    torch.float32 (no bf16 rounding, for checking). `device`: default the mesh's device, else
    the CPU.

    With a `mesh` (parallel.mesh.init_distributed, under torchrun) this rank reads only its
    slices (split by `moe` "tp"|"ep" and `unembed` "vocab"|"dim", or as `layout` says) and the
    model gets its collectives over the mesh's tp axis; only the first rank shows progress.
    A `layout` without a mesh gives that rank's slices without collectives (to inspect them).

    Raises CheckpointError naming the folder or file (UnsafePickleError for a pickle that would
    run code), ConfigError for a bad config or a split the model does not allow.
    """
    path = Path(source)
    fmt = detect_format(path)
    layout = rank_layout(mesh, layout, moe=moe, unembed=unembed)
    if config is not None and not isinstance(config, Grok2Config):  # Grok-2's: as it is
        config = GrokConfig.resolve(config)
    request = ReadRequest(config,
                          _place(device, mesh), dtype, layout,
                          progress and (mesh is None or mesh.is_main))
    return _finish(fmt.read(path, request), mesh, layout)


def random_weights(config: GrokConfig | Grok2Config | str | Path, *,
                   quantized: bool | None = None, seed: int = 0, std: float = 0.02,
                   router_std: float = 0.5, device: torch.device | str | None = None,
                   dtype: torch.dtype = BF16, mesh: Mesh | None = None,
                   layout: Layout | None = None, moe: str = "tp",
                   unembed: str = "vocab", weights: str | WeightFormat | None = None) -> Grok1:
    """A Grok1 of random weights: int8 matrices with bf16 scales (`quantized`) or `dtype`
    ones (default: the release's form, int8 for Grok-1, bf16 for a Grok2Config), or another
    format (`weights`: "int4", "fp8", a grok1.quant.WeightFormat; uniform random codes), of
    about `std` per entry; the embedding (and an untied head) normal(std), norm scales
    1 + normal(0.1), and routers of std `router_std / sqrt(emb_size)`, so that router logits
    have std about `router_std` (a decisive router keeps bf16 noise from swapping experts).
    A Grok2Config gives Grok-2's model at its shapes (`Grok2Config().replace(num_layers=4)`:
    full width, any depth), its dense MLP and head always `dtype`.

    Each tensor is drawn whole on `device` from its own generator, seeded by `seed` and its
    name, then cut to this rank's piece: a tensor's values do not depend on the others', and a
    rank's model (`mesh`, `layout`, `moe`, `unembed` as for `load`) is exactly the slice of the
    one-process model of the same seed, while no rank ever holds more than one whole tensor
    beyond its own slices. Values depend on the device's generator (CPU and CUDA differ).
    """
    fmt = weight_format(weights)
    if fmt is not None and quantized is not None and quantized != (fmt == INT8):
        raise ValueError(f"random_weights: quantized={quantized} contradicts "
                         f"weights={fmt.label()}")
    if fmt is None and (quantized if quantized is not None
                        else not isinstance(config, Grok2Config)):
        fmt = INT8
    config = (config.to_grok_config() if isinstance(config, Grok2Config)
              else GrokConfig.resolve(config))
    layout = rank_layout(mesh, layout, moe=moe, unembed=unembed)
    device = _place(device, mesh)
    request = ReadRequest(config, device, dtype, layout, progress=False)
    model = request.empty_model(config, True if fmt == INT8 else fmt, dtype)
    shard_fn = request.shard_fn(config, None if fmt == INT8 else fmt)
    with torch.device("meta"):
        whole = Grok1(config, weights=fmt, dtype=dtype)
    g = torch.Generator(device)
    with torch.no_grad():
        for name, spec in itertools.chain(whole.named_parameters(), whole.named_buffers()):
            g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            t = _draw(name, spec.shape, spec.dtype, g, device, std=std, router_std=router_std,
                      emb_size=config.emb_size, fmt=fmt)
            if shard_fn is not None:  # a copy of the piece: the whole tensor is freed
                t = shard_fn(name, t).clone(memory_format=torch.contiguous_format)
            assign_tensor(model, name, t)
    return _finish(model, mesh, layout)


# the std of a format's stored values as _draw draws them: uniform int8 -127..127, uniform
# int4 codes -8..7 (every byte), normal fp8 of std 64 (e4m3 saturates at 448: 7 std)
_VALUE_STD = {"int8": 127 / math.sqrt(3), "int4": math.sqrt((16 ** 2 - 1) / 12), "fp8": 64.0}


def _draw(name: str, shape: torch.Size, dtype: torch.dtype, g: torch.Generator,
          device: torch.device, *, std: float, router_std: float, emb_size: int,
          fmt: WeightFormat | None = None) -> torch.Tensor:
    """One tensor of random_weights, by the role its name says (`fmt`: the matrices' format)."""
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, generator=g, device=device, dtype=torch.int8)
    if dtype == torch.uint8:  # packed int4: two uniform codes per byte
        return torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8)
    if dtype == torch.float8_e4m3fn:
        t = torch.randn(shape, generator=g, device=device) * _VALUE_STD["fp8"]
        return t.clamp_(-448.0, 448.0).to(dtype)
    if name.endswith("scales") and fmt is not None and fmt != INT8:
        u = torch.rand(shape, generator=g, device=device, dtype=torch.float32)
        t = (std / _VALUE_STD[fmt.name]) * (0.5 + u)  # entries of std ~`std`
    elif name.endswith("scales"):  # uniform int8 has std 127 / sqrt(3): entries of std ~`std`
        u = torch.rand(shape, generator=g, device=device, dtype=torch.float32)
        t = (std * math.sqrt(3) / 127) * (0.5 + u)
    elif name.endswith("norm.scale"):
        t = 1 + 0.1 * torch.randn(shape, generator=g, device=device)
    elif name.endswith("router"):
        t = torch.randn(shape, generator=g, device=device) * router_std / math.sqrt(emb_size)
    else:  # the embedding and dense matrices
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std
    return t.to(dtype)
