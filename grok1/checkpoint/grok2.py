"""Grok-2's release checkpoint (xai-org/grok-2): pre-sharded safetensors, read into any TP size.

Reader API (the shape every format takes behind grok1.load):
    detect(path) -> bool                      whether `path` is a folder in this format
    read(path, config, want=None) -> Iterator[(name, tensor)]
        every tensor of `want` (TensorSlices or names, grok1.checkpoint.slices; None = all,
        whole) as (grok1 name, CPU tensor in the file's dtype, contiguous, grok1's layout).
        All files are checked against `config` (names, shapes, dtypes, the shard set) before
        anything is read; then each slice reads only the files and bytes it covers.
    tp_want(config, tp_rank, tp_size) -> list[TensorSlice]   SGLang's tensor-parallel split
    load_grok2(path, config, device, dtype, model=, want=) -> Grok1   whole, or a rank's slices

Format (SPEC section 4): `pytorch_model-NNNNN-TP-common.safetensors` files hold whole tensors;
`pytorch_model-NNNNN-TP-RRR.safetensors`, R = 0..n-1 (n = 8 in the release), hold pre-shard R of
each expert matrix: rows R*F/n:(R+1)*F/n of w1 (gate) and w3 (up), the same columns of w2
(down), every expert under its full name in each of the n files. Names are SGLang's parameter
tree, matrices stored [out, in] as torch.nn.Linear.

Names (grok1 style, parallel to names.py; matrices [(E,) in, out] as model.py's Linear):
    model.embed_tokens.weight                      embed                  [V, D]
    lm_head.weight                                 lm_head.weight         [D, V] (untied)
    model.norm.weight                              norm.scale             [D]
    model.layers.{i}. below, layers.{i}. in grok1:
    self_attn.{q,k,v,o}_proj.weight                attn.{wq,wk,wv,wo}.weight
    mlp.{gate,up,down}_proj.weight                 mlp.{w_gate,w_up,w_down}.weight  (dense MLP)
    block_sparse_moe.gate.weight                   moe.router             [D, E]
    block_sparse_moe.experts.{e}.{w1,w3,w2}.weight moe.{w_gate,w_up,w_down}.weight [E, D, F] / [E, F, D]
    {pre,post}_attn_norm.weight, {pre,post}_moe_norm.weight
                                                   attn_norm, attn_out_norm, moe_norm, moe_out_norm .scale
The same sandwich norms as Grok-1's (names.py), so the norm names carry over unchanged.

Nothing is converted: bf16 stays bf16 (SGLang upcasts the router to f32 and multiplies lm_head
by output_multiplier_scale at load; both are the model's business, SPEC 2.5-2.6).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from grok1.checkpoint.names import CheckpointError, assign_tensor, name_mismatch
from grok1.checkpoint.slices import TensorSlice, layout_want, normalize_want
from grok1.config_grok2 import Grok2Config
from grok1.model import BF16, Grok1
from grok1.sharding import Layout

__all__ = ["Reader", "detect", "grok1_shapes", "load_grok2", "read", "scan", "tp_want"]
CONFIG_FILE = "config.json"

_FILE = re.compile(r"pytorch_model-(\d{5})-TP-(common|\d{3})\.safetensors")
_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

# (SGLang name, grok1 name, transposed): model-level and per-layer tensors stored whole
TOP_NAMES: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed", False),  # [V, D] in both: a table, not a Linear
    ("lm_head.weight", "lm_head.weight", True),
    ("model.norm.weight", "norm.scale", False),
)
LAYER_NAMES: tuple[tuple[str, str, bool], ...] = (
    ("self_attn.q_proj.weight", "attn.wq.weight", True),
    ("self_attn.k_proj.weight", "attn.wk.weight", True),
    ("self_attn.v_proj.weight", "attn.wv.weight", True),
    ("self_attn.o_proj.weight", "attn.wo.weight", True),
    ("block_sparse_moe.gate.weight", "moe.router", True),
    ("pre_attn_norm.weight", "attn_norm.scale", False),
    ("post_attn_norm.weight", "attn_out_norm.scale", False),
    ("pre_moe_norm.weight", "moe_norm.scale", False),
    ("post_moe_norm.weight", "moe_out_norm.scale", False),
)
DENSE_MLP_NAMES: tuple[tuple[str, str, bool], ...] = (  # only with residual_moe
    ("mlp.gate_proj.weight", "mlp.w_gate.weight", True),
    ("mlp.up_proj.weight", "mlp.w_up.weight", True),
    ("mlp.down_proj.weight", "mlp.w_down.weight", True),
)
# (SGLang name of expert e, grok1 stacked name, file dim of the expert width F, the dim pre-shards
# split): w1/w3 are [F, D] split along rows, w2 is [D, F] split along columns (SPEC 4)
EXPERT_NAMES: tuple[tuple[str, str, int], ...] = (
    ("block_sparse_moe.experts.{e}.w1.weight", "moe.w_gate.weight", 0),
    ("block_sparse_moe.experts.{e}.w3.weight", "moe.w_up.weight", 0),
    ("block_sparse_moe.experts.{e}.w2.weight", "moe.w_down.weight", 1),
)
LAYER_PREFIX_SGLANG = "model.layers.{i}."
LAYER_PREFIX = "layers.{i}."


class _Stored(NamedTuple):
    """One tensor as the files hold it: the file of each pre-shard (one entry if whole)."""
    sglang_name: str
    files: tuple[Path, ...]
    shape: tuple[int, ...]  # of one piece
    dtype: str  # safetensors' dtype name


class _Source(NamedTuple):
    """How one grok1 tensor is made from the files."""
    sglang_names: tuple[str, ...]  # one, or one per expert
    transposed: bool  # matrices: file [out, in] -> grok1 [in, out]
    width_dim: int | None  # experts: the file dim of F, the dim pre-shards split


def detect(path: str | Path) -> bool:
    """Whether `path` is a folder holding Grok-2 release files (-TP-common safetensors)."""
    path = Path(path)
    return path.is_dir() and any(
        (m := _FILE.fullmatch(p.name)) and m.group(2) == "common" for p in path.iterdir())


def sources(config: Grok2Config) -> dict[str, _Source]:
    """grok1 name -> where it comes from, in file order of a layer's tensors."""
    out = {ours: _Source((theirs,), t, None) for theirs, ours, t in TOP_NAMES}
    for i in range(config.num_layers):
        p_theirs, p_ours = LAYER_PREFIX_SGLANG.format(i=i), LAYER_PREFIX.format(i=i)
        names = LAYER_NAMES + (DENSE_MLP_NAMES if config.residual_moe else ())
        for theirs, ours, t in names:
            out[p_ours + ours] = _Source((p_theirs + theirs,), t, None)
        for theirs, ours, width_dim in EXPERT_NAMES:
            per_expert = tuple(p_theirs + theirs.format(e=e) for e in range(config.num_experts))
            out[p_ours + ours] = _Source(per_expert, True, width_dim)
    return out


def grok1_shapes(config: Grok2Config) -> dict[str, tuple[int, ...]]:
    """grok1 name -> full shape in grok1's layout, for every tensor of a Grok-2 checkpoint."""
    c = config
    D, V, E, F = c.emb_size, c.vocab_size, c.num_experts, c.expert_width
    q, kv = c.num_q_heads * c.key_size, c.num_kv_heads * c.key_size
    per_layer = {"attn.wq.weight": (D, q), "attn.wk.weight": (D, kv), "attn.wv.weight": (D, kv),
                 "attn.wo.weight": (q, D), "moe.router": (D, E),
                 "attn_norm.scale": (D,), "attn_out_norm.scale": (D,), "moe_norm.scale": (D,),
                 "moe_out_norm.scale": (D,),
                 "mlp.w_gate.weight": (D, c.dense_width), "mlp.w_up.weight": (D, c.dense_width),
                 "mlp.w_down.weight": (c.dense_width, D),
                 "moe.w_gate.weight": (E, D, F), "moe.w_up.weight": (E, D, F),
                 "moe.w_down.weight": (E, F, D)}
    shapes = {"embed": (V, D), "lm_head.weight": (D, V), "norm.scale": (D,)}
    for name in sources(config):
        m = re.fullmatch(r"layers\.\d+\.(.+)", name)
        if m:
            shapes[name] = per_layer[m.group(1)]
    return shapes


def _file_shape(source: _Source, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The full shape of one file tensor (one expert's, for experts) behind a grok1 shape."""
    per_tensor = shape[1:] if source.width_dim is not None else shape
    return tuple(reversed(per_tensor)) if source.transposed else per_tensor


# ---- scanning: every file's header, checked against the config before any data is read ------

def scan(path: str | Path, config: Grok2Config) -> dict[str, _Stored]:
    """SGLang name -> _Stored for every tensor in the folder, checked against `config`: the file
    set (every pre-shard rank present), names (none missing, none unexpected), shapes, dtypes.
    Raises CheckpointError naming the folder or file, the tensor, expected and found."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    files = sorted(p for p in folder.iterdir() if _FILE.fullmatch(p.name))
    if not files:
        raise CheckpointError(f"{folder}: no pytorch_model-NNNNN-TP-*.safetensors files; not a "
                              "Grok-2 release folder")
    ranks_by_number: dict[str, set[int]] = {}
    for p in files:
        number, tp = _FILE.fullmatch(p.name).groups()
        if tp != "common":
            ranks_by_number.setdefault(number, set()).add(int(tp))
    n_shards = max((max(r) + 1 for r in ranks_by_number.values()), default=1)
    for number, ranks in sorted(ranks_by_number.items()):
        absent = sorted(set(range(n_shards)) - ranks)
        if absent:
            raise CheckpointError(f"{folder.name}/pytorch_model-{number}-TP-{absent[0]:03d}"
                                  f".safetensors missing: its siblings hold {n_shards} pre-shards")

    pieces: dict[str, dict[int | None, tuple[Path, tuple[int, ...], str]]] = {}
    for p in files:
        tp = _FILE.fullmatch(p.name).group(2)
        rank = None if tp == "common" else int(tp)
        try:
            with safe_open(p, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    s = f.get_slice(name)
                    seen = pieces.setdefault(name, {})
                    if rank in seen or (None in seen) or (rank is None and seen):
                        other = next(iter(seen.values()))[0].name
                        raise CheckpointError(f"{folder.name}/{p.name}: {name} is also in {other}")
                    seen[rank] = (p, tuple(s.get_shape()), s.get_dtype())
        except SafetensorError as e:
            raise CheckpointError(f"{folder.name}/{p.name}: not a readable safetensors file "
                                  f"({e}); truncated? fetch it again") from None

    expected = _expected_file_shapes(config)
    if mismatch := name_mismatch(expected, pieces):
        raise CheckpointError(f"{folder.name} does not hold the model its config describes "
                              f"({config.num_layers} layers, {config.num_experts} experts"
                              f"{', dense MLP' if config.residual_moe else ''}): " + mismatch)

    want_dtype = _DTYPE_NAMES[config.checkpoint_dtype]
    stored = {}
    for name, (full, width_dim) in expected.items():
        by_rank = pieces[name]
        if None in by_rank:
            ranks, split = [None], 1
        elif width_dim is None:
            path0 = by_rank[min(by_rank)][0]
            raise CheckpointError(f"{folder.name}/{path0.name}: {name} is pre-sharded, but only "
                                  "expert matrices are in the release's layout")
        else:
            ranks, split = list(range(n_shards)), n_shards
            for r in ranks:
                if r not in by_rank:
                    have = by_rank[min(by_rank)][0].name.replace(f"TP-{min(by_rank):03d}",
                                                                 f"TP-{r:03d}")
                    raise CheckpointError(f"{folder.name}/{have} ({name}): pre-shard {r} of "
                                          f"{split} missing from the file")
        shape = list(full)
        if width_dim is not None:
            if full[width_dim] % split:
                raise CheckpointError(f"{folder.name}: {name}: expert width {full[width_dim]} "
                                      f"does not split into the files' {split} pre-shards")
            shape[width_dim] //= split
        for r in ranks:
            p, got, dtype = by_rank[r]
            where = f"{folder.name}/{p.name} ({name})"
            if got != tuple(shape):
                what = f"pre-shard {r} of {split}: " if r is not None else ""
                raise CheckpointError(f"{where}: {what}shape {tuple(shape)} expected, file has "
                                      f"{got}")
            if dtype != want_dtype:
                raise CheckpointError(f"{where}: dtype {want_dtype} expected (config torch_dtype="
                                      f"{config.checkpoint_dtype}), file has {dtype}")
        stored[name] = _Stored(name, tuple(by_rank[r][0] for r in ranks), tuple(shape), want_dtype)
    return stored


def _expected_file_shapes(config: Grok2Config) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """SGLang name -> (full file shape, file dim of the expert width or None)."""
    shapes = grok1_shapes(config)
    out = {}
    for ours, src in sources(config).items():
        for theirs in src.sglang_names:
            out[theirs] = (_file_shape(src, shapes[ours]), src.width_dim)
    return out


# ---- reading ---------------------------------------------------------------------------------

def read(path: str | Path, config: Grok2Config,
         want: Iterable[TensorSlice | str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(grok1 name, tensor) for each entry of `want` (None: every tensor, whole), in its order.

    Each tensor is in grok1's layout ([(E,) in, out] matrices) and the file's dtype, contiguous
    and owned (not a view of a file mapping). A slice reads only the bytes it covers: from the
    pre-shard files that overlap its expert-width range, a whole tensor of the common files
    narrowed along the slice's dim. Raises CheckpointError (see `scan`), ValueError for a
    `want` entry that is not a tensor of `config`'s model or out of its range.
    """
    reader = Reader(path, config)
    for s in normalize_want(want, reader.shapes):
        yield s.name, reader.slice(s)


class Reader:
    """A Grok-2 folder scanned once (`scan`), then read slice by slice on demand (`read` is
    one pass of it; `grok1 convert` asks for one expert or block of rows at a time)."""

    def __init__(self, path: str | Path, config: Grok2Config):
        self.folder = Path(path)
        self.stored = scan(self.folder, config)
        self.shapes = grok1_shapes(config)
        self.sources = sources(config)
        self._handles: dict[Path, object] = {}

    def _open(self, p: Path):
        if p not in self._handles:
            try:
                self._handles[p] = safe_open(p, framework="pt")
            except SafetensorError as e:
                raise CheckpointError(f"{self.folder.name}/{p.name}: not readable ({e})") from None
        return self._handles[p]

    def slice(self, s: TensorSlice) -> torch.Tensor:
        """The tensor `s` asks for (a checked TensorSlice of a name in `shapes`)."""
        return _read_slice(s, self.shapes[s.name], self.sources[s.name], self.stored, self._open)


def _read_slice(s: TensorSlice, shape: tuple[int, ...], src: _Source,
                stored: dict[str, _Stored], open_file) -> torch.Tensor:
    bounds = s.bounds(shape)
    if src.width_dim is None:
        st = stored[src.sglang_names[0]]
        index = [slice(None)] * len(shape)
        if bounds is not None:
            dim, start, stop = bounds
            file_dim = len(shape) - 1 - dim if src.transposed else dim
            index[file_dim] = slice(start, stop)
        t = open_file(st.files[0]).get_slice(st.sglang_name)[tuple(index)]
        return (t.T if src.transposed else t).contiguous()

    # Experts: grok1 [E, in, out] from per-expert files [out, in]; grok1 dim d (1 or 2) is file
    # dim 2 - d. The width range picks the pre-shards it overlaps and a range within each.
    dim, start, stop = bounds if bounds is not None else (None, 0, 0)
    experts = range(start, stop) if dim == 0 else range(shape[0])
    width_grok1 = 2 - src.width_dim  # grok1 dim of F
    F = shape[width_grok1]
    f0, f1 = (start, stop) if dim == width_grok1 else (0, F)
    other = slice(start, stop) if dim == 3 - width_grok1 else slice(None)
    mats = []
    for e in experts:
        st = stored[src.sglang_names[e]]
        piece = st.shape[src.width_dim]
        parts = []
        for r, p in enumerate(st.files):
            lo, hi = max(f0, r * piece), min(f1, (r + 1) * piece)
            if lo >= hi:
                continue  # this rank's slice does not touch pre-shard r: its file is not read
            index = [other, other]
            index[src.width_dim] = slice(lo - r * piece, hi - r * piece)
            parts.append(open_file(p).get_slice(st.sglang_name)[tuple(index)])
        mats.append(torch.cat(parts, dim=src.width_dim).T)
    return torch.stack(mats).contiguous()


# ---- the tensor-parallel plan SGLang uses --------------------------------------------------

def tp_want(config: Grok2Config, tp_rank: int, tp_size: int) -> list[TensorSlice]:
    """Rank `tp_rank` of `tp_size`'s slices by grok1.sharding's plan, which is SGLang's split
    (S1): q/k/v, the dense MLP's gate/up and every expert's w1/w3 by output columns, o, the
    dense down and every expert's w2 by input rows (experts split along their width on every
    rank, as the release's pre-shards are); embedding, head, norms and router whole. kv heads
    are split when tp_size divides them, else replicated (each rank takes the one its query
    heads use). Raises ConfigError (a ValueError) when the sizes do not divide, naming them."""
    layout = Layout(tp_size, tp_rank, unembed="none")
    return layout_want(config.to_grok_config(), layout, grok1_shapes(config))


# ---- the model ---------------------------------------------------------------------------

def load_grok2(path: str | Path, config: Grok2Config | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = BF16, *,
               model: Grok1 | None = None,
               want: Iterable[TensorSlice | str] | None = None) -> Grok1:
    """The Grok-2 model in the release folder `path` (config: its config.json unless given),
    in eval mode with gradients off. `dtype` is the compute dtype: bf16 (SGLang's storage
    points) or torch.float32 (no bf16 rounding; the golden's float32 check). The weights keep
    the files' bf16 values (router and norms as f32 parameters, exactly).
    A tensor-parallel rank passes `model` (on the meta device, already cut to its shapes) and
    `want` (its slices, slices.layout_want): only those bytes are read. Default: the whole
    model. Raises CheckpointError (see `scan`), ConfigError for a bad config.json."""
    folder = Path(path)
    if config is None:
        config = Grok2Config.from_json(folder / CONFIG_FILE)
    if model is None:
        with torch.device("meta"):
            model = Grok1(config.to_grok_config(), compute_dtype=dtype)
    targets = dict(model.state_dict(keep_vars=True))
    shapes = grok1_shapes(config)
    missing, unexpected = sorted(targets.keys() - shapes.keys()), sorted(shapes.keys() - targets)
    assert not missing and not unexpected, (missing, unexpected)  # one table, two readers
    for name, tensor in read(folder, config, want):
        target = targets[name]
        assert tensor.shape == target.shape, (name, tensor.shape, target.shape)  # one plan
        assign_tensor(model, name, tensor.to(device=device, dtype=target.dtype))
    return model.eval().requires_grad_(False)
