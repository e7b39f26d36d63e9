"""The MoE across ranks: whole experts per rank ("ep") or each expert's width split ("tp").

Every rank sees all tokens (the hidden state is replicated after attention's all-reduce), routes
them itself (the router is replicated), and computes the contribution of what it holds:
- "ep": its own experts, for the (token, slot) pairs routed to them;
- "tp": every expert, over its columns of w_gate/w_up and rows of w_down.
The partial outputs are summed over the ranks in f32 and rounded to bf16 once, as one process
rounds the gated f32 sum (SPEC 2.6) and as the reference psums linear_1 in f32 (SPEC 2.8). Under
"ep" a token's output has at most top-k nonzero terms, so the sum is exactly one process's.

An all-to-all dispatch (tokens sent to the rank of their expert) only pays when the ranks hold
different tokens (data-parallel attention); here they hold the same ones, so each rank picks its
pairs locally and one all-reduce combines them. Shape letters as in model.py; P = routed pairs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from grok1.model import Grok1, MoE, moe_ref, route, wide_dtype
from grok1.parallel.mesh import all_reduce_, group_size


def expert_partial(x_MD: torch.Tensor, gates_MA: torch.Tensor, ids_MA: torch.Tensor, moe: MoE,
                   experts: range) -> torch.Tensor:
    """[M, D] in `wide_dtype` (f32 on GPUs): the gated outputs of the `experts` (global ids)
    that `moe` holds, in order."""
    wide = wide_dtype(x_MD.device)
    if len(experts) == moe.router.shape[1]:  # every expert here (whole, or width-split)
        return moe_ref(x_MD, gates_MA, ids_MA, moe.w_gate, moe.w_up, moe.w_down,
                       out_dtype=wide)
    here_MA = (ids_MA >= experts.start) & (ids_MA < experts.stop)
    rows_P, slots_P = here_MA.nonzero(as_tuple=True)
    out = torch.zeros(x_MD.shape, dtype=wide, device=x_MD.device)
    if rows_P.numel():
        local_ids_P1 = (ids_MA[rows_P, slots_P] - experts.start)[:, None]
        y_PD = moe_ref(x_MD[rows_P], gates_MA[rows_P, slots_P][:, None], local_ids_P1,
                       moe.w_gate, moe.w_up, moe.w_down, out_dtype=wide)
        out.index_add_(0, rows_P, y_PD)
    return out


def kernel_partial(x_MD: torch.Tensor, gates_MA: torch.Tensor, ids_MA: torch.Tensor,
                   moe: MoE, experts: range) -> torch.Tensor:
    """`expert_partial` through the fused MoE kernels (grok1.ops.moe), with static shapes for
    CUDA graphs: pairs routed to other ranks' experts go to local expert 0 with gate 0, so they
    add exactly 0 (their compute is wasted; a drop id in moe_align would save it)."""
    from grok1.ops.moe import fused_moe

    if len(experts) < moe.router.shape[1]:
        local_MA = ids_MA - experts.start
        here_MA = (local_MA >= 0) & (local_MA < len(experts))
        ids_MA = torch.where(here_MA, local_MA, 0)
        gates_MA = torch.where(here_MA, gates_MA, 0.0)
    w_gate, w_up, w_down = moe.w_gate, moe.w_up, moe.w_down
    return fused_moe(x_MD, gates_MA, ids_MA, w_gate.weight, w_gate.scales, w_up.weight,
                     w_up.scales, w_down.weight, w_down.scales, out_dtype=torch.float32)


class ParallelMoE(MoE):
    """MoE holding `experts` (global ids) or a width slice of all; swapped in as the module's
    class by `install_moe_reduce`, so its parameters and names stay MoE's. On CUDA it runs the
    fused kernels itself (`kernel_backed`: the engine's kernel swap leaves it in place)."""

    experts: range
    moe_group: dist.ProcessGroup | None
    kernel_backed = True
    _kernel_ok: bool

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x = x_BTD.reshape(-1, x_BTD.shape[-1])
        return self.partial_sums(x).float().to(x.dtype).view_as(x_BTD)

    def partial_sums(self, x_MD: torch.Tensor) -> torch.Tensor:
        """The f32 sum over ranks [M, D], before its one rounding to bf16 (the engine's fused
        residual norm rounds it)."""
        from grok1.ops._triton import use_kernel
        from grok1.ops.router import route_op

        # the kernels' router at inference; the twin while training (its logits feed losses)
        logits, gates, ids = (route if self.training else route_op)(x_MD, self.router, self.top_k)
        if self.training:
            self.last_router_logits, self.last_expert_ids = logits, ids
        partial = kernel_partial if self._kernel_ok and use_kernel(x_MD) else expert_partial
        return all_reduce_(partial(x_MD, gates, ids, self, self.experts), self.moe_group)


def install_moe_reduce(moe: MoE, experts: range, group: dist.ProcessGroup | None) -> None:
    """Make `moe` (already sharded) compute its local part and all-reduce it over `group`."""
    from grok1.ops.moe import kernel_supported

    held = moe.w_gate.weight.shape[0]
    if held != len(experts):
        raise ValueError(f"MoE holds {held} experts but the layout gives it {len(experts)}")
    moe.__class__ = ParallelMoE
    moe.experts = experts
    moe.moe_group = group
    _, D, F = moe.w_gate.weight.shape
    groups_in = moe.w_gate.scales.shape[-2] if moe.w_gate.quantized else 1
    groups_down = moe.w_down.scales.shape[-2] if moe.w_down.quantized else 1
    moe._kernel_ok = kernel_supported(D, F, groups_in, groups_down)


def apply_ep(model: Grok1, ep_group: dist.ProcessGroup | None) -> Grok1:
    """Expert parallelism alone: whole experts per rank of `ep_group`; attention and the
    unembedding stay whole on every rank. (`apply_tp(model, g, moe="ep")` combines both.)"""
    from grok1.parallel.tensor import Layout, parallelize  # tensor.py holds the one table

    rank = 0 if ep_group is None else dist.get_rank(ep_group)
    layout = Layout(group_size(ep_group), rank, attn="none", moe="ep", unembed="none")
    return parallelize(model, ep_group, layout)
