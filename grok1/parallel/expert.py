"""The MoE across ranks: whole experts per rank ("ep") or each expert's width split ("tp").

Every rank sees all tokens (the hidden state is replicated after attention's all-reduce), routes
them itself (the router is replicated), and computes the contribution of what it holds:
- "ep": its own experts, for the (token, slot) pairs routed to them;
- "tp": every expert, over its columns of w_gate/w_up and rows of w_down.
The partial outputs are summed over the ranks in f32 and rounded to bf16 once, as one process
rounds the gated f32 sum (SPEC 2.6) and as the reference psums linear_1 in f32 (SPEC 2.8). Under
"ep" a token's output has at most top-k nonzero terms, so the sum is exactly one process's.
Grok-2 (rounding "sglang", grok2 SPEC 2.5) rounds each selected expert's gated output to the
compute dtype before adding the slots: the ranks then all-reduce one partial per slot [M, A, D]
and round each slot's sum, so that the slots add as in one process (ops.moe.sum_slots_sglang).

An all-to-all dispatch (tokens sent to the rank of their expert) only pays when the ranks hold
different tokens (data-parallel attention); here they hold the same ones, so each rank picks its
pairs locally and one all-reduce combines them. Shape letters as in model.py; P = routed pairs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from grok1.model import MoE, PartialSums, moe_ref, route, wide_dtype
from grok1.ops.moe import FusedMoE, sum_slots_sglang
from grok1.parallel.mesh import all_reduce_


def expert_partial(x_MD: torch.Tensor, gates_MA: torch.Tensor, ids_MA: torch.Tensor,
                   moe: FusedMoE, experts: range, *, gelu: str = "tanh",
                   rounding: str = "jax") -> torch.Tensor:
    """[M, D] in `wide_dtype` (f32 on GPUs): the gated outputs of the `experts` (global ids)
    that `moe` holds, in order; `gelu` and `rounding` as model.moe_ref's (Grok-2: "erf",
    "sglang")."""
    wide = wide_dtype(x_MD.device)
    math = {"gelu": gelu, "rounding": rounding}
    if len(experts) == moe.router.shape[1]:  # every expert here (whole, or width-split)
        return moe_ref(x_MD, gates_MA, ids_MA, moe.w_gate, moe.w_up, moe.w_down,
                       out_dtype=wide, **math)
    here_MA = (ids_MA >= experts.start) & (ids_MA < experts.stop)
    rows_P, slots_P = here_MA.nonzero(as_tuple=True)
    out = torch.zeros(x_MD.shape, dtype=wide, device=x_MD.device)
    if rows_P.numel():
        local_ids_P1 = (ids_MA[rows_P, slots_P] - experts.start)[:, None]
        y_PD = moe_ref(x_MD[rows_P], gates_MA[rows_P, slots_P][:, None], local_ids_P1,
                       moe.w_gate, moe.w_up, moe.w_down, out_dtype=wide, **math)
        out.index_add_(0, rows_P, y_PD)
    return out


def slot_partials(x_MD: torch.Tensor, gates_MA: torch.Tensor, ids_MA: torch.Tensor,
                  moe: FusedMoE, experts: range, *, gelu: str = "tanh",
                  rounding: str = "jax") -> torch.Tensor:
    """[M, A, D] in `wide_dtype`: `expert_partial` of each slot (the a-th selected expert of
    every token) apart, for a sum over ranks that rounds each slot before adding them."""
    return torch.stack([expert_partial(x_MD, gates_MA[:, a:a + 1], ids_MA[:, a:a + 1], moe,
                                       experts, gelu=gelu, rounding=rounding)
                        for a in range(ids_MA.shape[1])], dim=1)


def kernel_partial(x_MD: torch.Tensor, gates_MA: torch.Tensor, ids_MA: torch.Tensor,
                   moe: FusedMoE, experts: range, *, per_slot: bool = False) -> torch.Tensor:
    """`expert_partial` (or, `per_slot`, `slot_partials`) in f32 through the fused MoE kernels
    (grok1.ops.moe, with the MoE's GELU and rounding), with static shapes for CUDA graphs:
    pairs routed to other ranks' experts get the id -1, which the grouped GEMMs skip (moe_align
    leaves them out; they add exactly 0), so a rank computes only its own pairs."""
    from grok1.ops.moe import fused_moe

    partial = len(experts) < moe.router.shape[1]
    if partial:
        local_MA = ids_MA - experts.start
        here_MA = (local_MA >= 0) & (local_MA < len(experts))
        ids_MA = torch.where(here_MA, local_MA, -1)
    w_gate, w_up, w_down = moe.w_gate, moe.w_up, moe.w_down
    out = fused_moe(x_MD, gates_MA, ids_MA, w_gate.weight, w_gate.scales, w_up.weight,
                    w_up.scales, w_down.weight, w_down.scales, out_dtype=torch.float32,
                    reduce=not per_slot, gelu=moe.gelu, rounding=moe.rounding,
                    weights=moe.weights, has_dropped=partial)
    return out.sum(0) if per_slot else out  # [S, M, A, D] terms: the K splits summed


class ParallelMoE(FusedMoE):
    """MoE holding `experts` (global ids) or a width slice of all, in place of a MoE
    (`grok1.parallel.parallelize`): the same tensors under the same names; on CUDA the fused
    kernels (`kernel_ok`), else the twin; the local part is all-reduced over `group`."""

    def __init__(self, moe: MoE, experts: range, group: dist.ProcessGroup | None):
        held = moe.w_gate.weight.shape[0]
        if held != len(experts):
            raise ValueError(f"MoE holds {held} experts but the layout gives it {len(experts)}")
        super().__init__(moe)  # also the router cap, GELU and rounding (Grok-2's math), and
        # whether the kernels tile this rank's experts in their format (any: FusedMoE)
        self.experts = experts
        self.group = group
        self.last_router_logits: torch.Tensor | None = None  # as MoE's, while training
        self.last_expert_ids: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> PartialSums | torch.Tensor:
        """The f32 sum over ranks [1, M, D] (f64 on the CPU), before its one rounding to bf16
        (`value()`, or the engine's fused residual norm); under SGLang's rounding the value
        [..., D] in x's dtype (module doc)."""
        from grok1.ops._triton import use_kernel
        from grok1.ops.router import route_op

        x_MD = x_BTD.reshape(-1, x_BTD.shape[-1])
        # the kernels' router at inference; the twin while training (its logits feed losses)
        route_fn = route if self.training else route_op
        logits, gates, ids = route_fn(x_MD, self.router, self.top_k, self.router_softcap)
        if self.training:
            self.last_router_logits, self.last_expert_ids = logits, ids
        kernels = self.kernel_ok and use_kernel(x_MD)
        math = {"gelu": self.gelu, "rounding": self.rounding}
        if self.rounding == "sglang":  # each slot rounded before the slots add (module doc)
            partials_MAD = (kernel_partial(x_MD, gates, ids, self, self.experts, per_slot=True)
                            if kernels else
                            slot_partials(x_MD, gates, ids, self, self.experts, **math))
            all_reduce_(partials_MAD, self.group)
            # through f32 (an f64 CPU sum too), as one process's f32 accumulator rounds
            return sum_slots_sglang(partials_MAD.float()[None], x_BTD.dtype).view_as(x_BTD)
        if kernels:
            partial = kernel_partial(x_MD, gates, ids, self, self.experts)
        else:
            partial = expert_partial(x_MD, gates, ids, self, self.experts, **math)
        return PartialSums(all_reduce_(partial, self.group)[None])
