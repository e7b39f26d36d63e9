"""LoRA (Hu et al. 2021) applied from outside, as a module swap: `apply_lora` puts a `LoraLinear`
in place of each targeted Linear (attention projections, and the experts' stacked matrices),
holding the same base tensors under the same names plus low-rank adapters.

    y = base(x) + scale * B(A(dropout(x)))      scale = alpha / r

The base path is the model's own `Linear.forward` (int8 stays int8 with its scales and is
dequantized on the fly, QLoRA-style; a dense matrix stays as it is), frozen; only the adapters
train. Experts carry one adapter each: A [E, r, in], B [E, out, r], added to the MoE's
products expert by expert (`Linear.expert_matmul`). Adapters are f32; their delta is added to
the base output in f32 (or the wide dtype of the expert down-projection's unrounded sum), then
rounded as the base output was.

Several adapters at once (serving): each LoraLinear stacks n adapters, [n, (E,) r, in] and
[n, (E,) out, r], and an `AdapterSelection` shared by the model's LoraLinears says which one
each flattened token of the current forward uses (0: none). The delta of all adapters is one
einsum over the stacked slots with the others masked to zero, batched over rows (no loop over
rows), so a token without an adapter gets exactly the base output.

Shape letters: M flattened tokens, n adapters, E experts, r rank, i input dim, o output dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from grok1.config import ConfigError
from grok1.model import BF16, Grok1, Linear, MoE, wide_dtype
from grok1.moe_dispatch import ExpertGroups, per_group

# the matrices an adapter may target, by their path within a decoder layer (model.py's names)
ATTENTION_TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo")
EXPERT_TARGETS = ("moe.w_gate", "moe.w_up", "moe.w_down")
TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """One adapter's shape: rank `r`, `alpha` (scale = alpha / r, PEFT's lora_alpha), dropout on
    the adapter's input while training, and the targeted matrices (TARGETS' names)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA r={self.r!r}: must be a positive integer")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha > 0):
            raise ConfigError(f"LoRA alpha={self.alpha!r}: must be a positive number")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout={self.dropout!r}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets {list(self.targets)}: expected a non-empty subset "
                              f"of {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class AdapterSelection:
    """Which adapter each flattened token of the current forward uses: `ids_M` in 0..n (0: the
    base model alone, k: adapter slot k - 1), or None, where a LoraLinear must hold one adapter
    and applies it everywhere (training). Shared by every LoraLinear of a model."""

    def __init__(self, num_adapters: int):
        self.num_adapters = num_adapters
        self.ids_M: torch.Tensor | None = None

    @contextlib.contextmanager
    def select(self, ids_M: torch.Tensor | None) -> Iterator[None]:
        """ids_M for the forwards inside the block (ValueError outside 0..num_adapters)."""
        if ids_M is not None and ids_M.numel() and not (
                0 <= int(ids_M.min()) and int(ids_M.max()) <= self.num_adapters):
            raise ValueError(f"adapter ids {ids_M.tolist()}: expected 0..{self.num_adapters}")
        previous, self.ids_M = self.ids_M, ids_M
        try:
            yield
        finally:
            self.ids_M = previous


class LoraLinear(Linear):
    """A Linear (the same base tensors, names and math) plus n stacked adapters:
    `lora_A` [n, (E,) r, in] and `lora_B` [n, (E,) out, r] f32, `lora_scale` [n] (alpha / r)."""

    def __init__(self, base: Linear, *, r: int, num_adapters: int, dropout: float,
                 selection: AdapterSelection):
        nn.Module.__init__(self)
        if type(base) is not Linear:
            raise ConfigError(f"LoRA wraps plain model.Linear modules, not {type(base).__name__}"
                              ": apply it before grok1.parallel or the engine's kernels")
        self.weights = base.weights
        if base.weights is None:
            self.weight = base.weight
            self.scales = None
        else:
            self.register_buffer("weight", base.weight)  # the same tensors, the same names
            self.register_buffer("scales", base.scales)
        lead, d_out = base.weight.shape[:-2], base.weight.shape[-1]  # [(E,) in, out]
        packed = base.weights is not None and base.weights.name == "int4"  # 2 rows a byte
        d_in = base.weight.shape[-2] * (2 if packed else 1)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(num_adapters, *lead, r, d_in, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, *lead, d_out, r, device=device))
        self.register_buffer("lora_scale", torch.ones(num_adapters, device=device))
        self.dropout = dropout
        self.selection = selection

    def delta(self, x: torch.Tensor, expert: int | None, rows: torch.Tensor | None
              ) -> torch.Tensor:
        """f32 [..., out]: the selected adapters' scale * B(A(dropout(x))), evaluated in
        `wide_dtype` (f64 on the CPU) as the model's f32 dots are, so that a row's delta does
        not depend on the kernel's order of summation, hence on the other rows of the batch."""
        wide = wide_dtype(x.device)
        A = self.lora_A if expert is None else self.lora_A[:, expert]  # [n, r, i]
        B = self.lora_B if expert is None else self.lora_B[:, expert]  # [n, o, r]
        lead = x.shape[:-1]
        x_Mi = x.reshape(-1, x.shape[-1]).to(A.dtype)
        if self.training and self.dropout:
            x_Mi = F.dropout(x_Mi, self.dropout)
        xa_Mnr = torch.einsum("mi,nri->mnr", x_Mi.to(wide), A.to(wide))
        xa_Mnr = xa_Mnr * self.lora_scale.to(wide)[:, None]
        ids_M = self.selection.ids_M
        if ids_M is not None:
            ids_M = ids_M if rows is None else ids_M[rows]
            if ids_M.shape[0] != x_Mi.shape[0]:
                raise ValueError(f"AdapterSelection has {ids_M.shape[0]} token ids for "
                                 f"{x_Mi.shape[0]} rows")
            slots = torch.arange(1, A.shape[0] + 1, device=ids_M.device)
            xa_Mnr = xa_Mnr * (ids_M[:, None] == slots).to(xa_Mnr.dtype)[:, :, None]
        elif A.shape[0] != 1:
            raise ValueError(f"{A.shape[0]} adapters loaded: select one per token "
                             "(AdapterSelection.select)")
        return torch.einsum("mnr,nor->mo", xa_Mnr, B.to(wide)).float().reshape(*lead, -1)

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        return _plus(super().forward(x, expert), self.delta(x, expert, None))

    def expert_matmul(self, x_PK: torch.Tensor, groups: ExpertGroups,
                      dot: Callable[..., torch.Tensor], backend: str | None = None
                      ) -> torch.Tensor:
        """The base's products plus each expert's delta; a pair's adapter is its token's
        (groups.rows_P: the token of each sorted pair)."""
        base = super().expert_matmul(x_PK, groups, dot, backend)
        return _plus(base, per_group(x_PK, groups, self.delta, groups.rows_P))

    def merged(self, slot: int = 0, expert: int | None = None) -> torch.Tensor:
        """f32 [in, out]: the base matrix plus adapter `slot`'s scale * (B A)^T."""
        A = self.lora_A[slot] if expert is None else self.lora_A[slot, expert]
        B = self.lora_B[slot] if expert is None else self.lora_B[slot, expert]
        wide = wide_dtype(A.device)
        delta = (B.to(wide) @ A.to(wide)).T * self.lora_scale[slot].to(wide)
        return (self.dense(expert).to(wide) + delta).float()


def _plus(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base + delta, added in f32 (or base's wider dtype) and rounded to base's dtype once."""
    wide = torch.promote_types(base.dtype, torch.float32)
    return (base.to(wide) + delta.to(wide)).to(base.dtype)


def lora_modules(model: Grok1) -> Iterator[tuple[str, LoraLinear]]:
    """(module path, LoraLinear) of every adapted matrix, in the model's order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def apply_lora(model: Grok1, config: LoraConfig, *, num_adapters: int = 1, seed: int = 0
               ) -> AdapterSelection:
    """Put LoraLinears in place of `config.targets` in every layer, in place; freeze everything
    else. The adapters start as PEFT's do (A kaiming-uniform, B zero: the model's output is
    unchanged), from a generator seeded by `seed`. Returns the model's AdapterSelection.
    ConfigError if the model was parallelized or already carries adapters."""
    if any(True for _ in lora_modules(model)):
        raise ConfigError("the model carries LoRA adapters already")
    model.requires_grad_(False)
    selection = AdapterSelection(num_adapters)
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        if type(layer.moe) is not MoE and any(t in EXPERT_TARGETS for t in config.targets):
            raise ConfigError(f"LoRA on the experts needs the plain model.MoE, not "
                              f"{type(layer.moe).__name__}")
        for target in config.targets:
            parent_name, _, attr = target.rpartition(".")
            parent = layer.get_submodule(parent_name)
            lora = LoraLinear(getattr(parent, attr), r=config.r, num_adapters=num_adapters,
                              dropout=config.dropout, selection=selection)
            with torch.no_grad():
                bound = 1 / math.sqrt(lora.lora_A.shape[-1])  # kaiming_uniform(a=sqrt(5))
                lora.lora_A.copy_((torch.rand(lora.lora_A.shape, generator=g) * 2 - 1) * bound)
                lora.lora_scale.fill_(config.scale)
            setattr(parent, attr, lora)
    return selection


def merge_lora(model: Grok1, slot: int = 0) -> Grok1:
    """A new dense Grok1 (bf16 matrices) whose every matrix is `model`'s as the forward sees it,
    with adapter `slot` merged into the adapted ones: bf16(W + scale * (B A)^T), one rounding.
    Matrices without an adapter are their exact bf16 dequantization; the rest is copied."""
    with torch.device("meta"):
        merged = Grok1(model.config, weights=None, dtype=BF16, compute_dtype=model.compute_dtype)
    device = model.embed.device
    merged.to_empty(device=device)
    with torch.no_grad():
        for name, module in merged.named_modules():
            if not isinstance(module, Linear):
                continue
            source = model.get_submodule(name)
            experts = module.weight.shape[0] if module.weight.dim() == 3 else None
            for e in range(experts) if experts else [None]:
                w = source.merged(slot, e) if isinstance(source, LoraLinear) else source.dense(e)
                (module.weight if e is None else module.weight[e]).copy_(w.to(BF16))
        for key, t in model.state_dict().items():
            target = merged.state_dict().get(key)
            if target is not None and not key.endswith((".weight", ".scales")):
                target.copy_(t)
        merged.embed.copy_(model.embed)
    return merged.eval().requires_grad_(False)
