"""The MoE's (token, slot) pairs grouped by expert, and matmuls over the groups, on the device.

`group_by_expert` sorts the P = M*A pairs by expert: a stable argsort of the flat expert ids
(so each group keeps token order, as the expert-by-expert loop's rows), per-expert counts by a
scatter-add (torch.bincount would read its maximum back to the host on a GPU) and group ends by
cumsum. `grouped_mm` multiplies each group's rows by its expert's matrix. Nothing here reads a
GPU tensor back to the host, except the backends that say so; all of it is differentiable.
`per_group` runs a function expert by expert instead (grok1.model uses it for quantized
matrices, dequantized one expert at a time).

grouped_mm backends (torch 2.13):
- "torch": torch._grouped_mm(x [P, K], w [E, K, N], offs=int32 group ends). On CUDA its fast
  path (CUTLASS) takes bf16 operands and output on compute capability 9.0 (Hopper) and 10.x,
  with row strides of a multiple of 16 bytes (K and N multiples of 8) and 16-byte aligned
  data; other dtypes (f32, since torch 2.9) and GPUs take torch's fallback, which copies the
  ends to the host (one sync per call) and runs one matmul per group. The output dtype is the
  operands' (bf16 out from an f32 accumulator, as cuBLAS's matmul); f64 is refused. Autograd:
  yes (CPU, CUDA). (torch 2.13 also names it torch.nn.functional.grouped_mm, a thin wrapper;
  the GPU machines' torch 2.11 is not known to have that name.)
- "padded": each group's rows scattered into a zero [E, C, K] buffer (C: a bound on any
  group's size, M for top-k ids, which are distinct per token), one bmm, the rows gathered
  back. No host sync on any device and any dtype, at E*C/P times the FLOPs (E/A = 4 for Grok).
- "segments": one matmul per group, over ends read on the host: the CPU's choice (there is no
  device to wait for, and it takes f64, the CPU's exact products: grok1.model.wide_dtype).

Shape letters: M tokens, A selected experts, P = M*A pairs, E experts, K and N a matrix's
input and output dims, C the padded backend's rows per expert.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

BACKENDS = ("torch", "padded", "segments")


@dataclasses.dataclass(frozen=True)
class ExpertGroups:
    """The pairs sorted by expert: sorted pair i is flat pair `order_P[i]` (= m * A + a), of
    token `rows_P[i]` and expert `experts_P[i]`; group e is sorted pairs ends[e-1]..ends[e]."""
    order_P: torch.Tensor  # long
    rows_P: torch.Tensor  # long
    experts_P: torch.Tensor  # long
    counts_E: torch.Tensor  # long
    ends_E: torch.Tensor  # int32 (torch._grouped_mm's offs)
    capacity: int  # no group holds more pairs (the padded backend's C)


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how many entries of `ids` name each expert (no host sync, unlike bincount)."""
    flat = ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def group_by_expert(ids_MA: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Sort the pairs of `ids_MA` (expert ids, distinct within a row, as top-k's) by expert."""
    M, A = ids_MA.shape
    flat = ids_MA.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(flat, num_experts)
    return ExpertGroups(order, order // A, flat[order], counts,
                        counts.cumsum(0).to(torch.int32), capacity=M)


def _aligned(t: torch.Tensor) -> bool:
    """A row-major matrix (or stack) whose rows start on 16-byte boundaries (TMA's need).
    Under torch.compile the data is not there to ask (its own buffers are aligned)."""
    return (t.stride(-1) == 1 and t.stride(-2) * t.element_size() % 16 == 0
            and (torch.compiler.is_compiling() or t.data_ptr() % 16 == 0))


def default_backend(x_PK: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """torch._grouped_mm on GPUs where its constraints hold, else padded; segments on CPUs."""
    if x_PK.device.type != "cuda":
        return "segments"
    if x_PK.dtype in (torch.bfloat16, torch.float32) and _aligned(x_PK) and _aligned(w_EKN):
        return "torch"
    return "padded"


def grouped_mm(x_PK: torch.Tensor, w_EKN: torch.Tensor, groups: ExpertGroups,
               backend: str | None = None) -> torch.Tensor:
    """[P, N]: row i of x (sorted by expert) times w[experts_P[i]], in the operands' dtype
    (one dtype for both). `backend`: one of BACKENDS; default `default_backend`."""
    backend = backend or default_backend(x_PK, w_EKN)
    if backend == "torch":
        if x_PK.is_cuda and w_EKN.requires_grad and torch.cuda.get_device_capability()[0] >= 10:
            # Blackwell's kernel gave empty groups nonzero weight gradients (pytorch#172439);
            # Hopper's gives zeros, as the math does. (A view: never a hook on a parameter.)
            nonempty_E11 = (groups.counts_E > 0).to(w_EKN.dtype)[:, None, None]
            w_EKN = w_EKN.view_as(w_EKN)
            w_EKN.register_hook(lambda g: g * nonempty_E11)
        out = torch._grouped_mm(x_PK, w_EKN, offs=groups.ends_E)
        if out.requires_grad and not torch.compiler.is_compiling():
            # its backward refuses a broadcast gradient (strides 0, as from out.sum()) in
            # torch 2.13; a dense one passes through as it is
            out.register_hook(lambda g: g.contiguous())
        return out
    if backend == "padded":
        E, K, _ = w_EKN.shape
        start_E = groups.ends_E.long() - groups.counts_E
        pos_P = torch.arange(x_PK.shape[0], device=x_PK.device) - start_E[groups.experts_P]
        x_ECK = x_PK.new_zeros(E, groups.capacity, K).index_put(
            (groups.experts_P, pos_P), x_PK)
        return torch.bmm(x_ECK, w_EKN)[groups.experts_P, pos_P]
    if backend == "segments":
        w_E = w_EKN.unbind(0)  # one op: its backward stacks the experts' gradients once
        return per_group(x_PK, groups, lambda x, e: x @ w_E[e])
    raise ValueError(f"grouped_mm backend={backend!r}: expected one of {', '.join(BACKENDS)}")


def per_group(x_PK: torch.Tensor, groups: ExpertGroups,
              fn: Callable[..., torch.Tensor], *aligned_P: torch.Tensor) -> torch.Tensor:
    """[P, ...]: fn(rows of group e, e, *their rows of each `aligned_P`) for each nonempty
    group, in order. Reads the group ends on the host (a sync on a GPU)."""
    ends = groups.ends_E.tolist()
    outs, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            outs.append(fn(x_PK[start:end], e, *(t[start:end] for t in aligned_P)))
        start = end
    if not outs:  # no pairs at all: fn's empty result, of its shape and dtype
        return fn(x_PK[:0], 0, *(t[:0] for t in aligned_P))
    return torch.cat(outs)
