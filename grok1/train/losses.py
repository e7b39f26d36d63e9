"""Training losses: next-token cross-entropy and the MoE router's auxiliary losses.

The reference has no training code; the router losses are the usual ones for top-k softmax
routers: Switch Transformer's load-balancing loss (Fedus et al. 2021, eq. 4-6, here over all A
slots of every token) and ST-MoE's router z-loss (Zoph et al. 2022, eq. 5).
Shapes: B batch, T tokens, V vocab, M flattened tokens, E experts, A selected experts.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from grok1.moe_dispatch import expert_counts
from grok1.train.data import IGNORE


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the counted targets (those not data.IGNORE: a masked chat
    prompt), computed in f32 (the logits are bf16 values); 0 when none is counted."""
    targets = targets_BT.flatten()
    total = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets, reduction="sum")
    return total / (targets != IGNORE).sum().clamp_min(1)


def load_balancing_loss(router_logits_ME: torch.Tensor, expert_ids_MA: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e the share of (token, slot) assignments that went to expert e,
    P_e the mean router probability of e. 1.0 when balanced, E when one expert takes all."""
    E = router_logits_ME.shape[-1]
    probs_E = torch.softmax(router_logits_ME.float(), dim=-1).mean(0)
    return E * (expert_fractions(expert_ids_MA, E) * probs_E).sum()


def z_loss(router_logits_ME: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the router logits; keeps them small."""
    return torch.logsumexp(router_logits_ME.float(), dim=-1).pow(2).mean()


def expert_fractions(expert_ids_MA: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] share of assignments per expert (sums to 1); no gradient (counts). Counted without
    torch.bincount, which reads its input's maximum back to the host on a GPU."""
    return expert_counts(expert_ids_MA, num_experts).float() / expert_ids_MA.numel()


@dataclasses.dataclass
class RouterLosses:
    balance: torch.Tensor  # mean over layers (so its weight does not depend on depth), differentiable
    z: torch.Tensor  # mean over layers, differentiable
    balance_per_layer: list[torch.Tensor]  # detached
    utilisation_per_layer: list[torch.Tensor]  # [E] shares, detached


def router_losses(layers: nn.ModuleList) -> RouterLosses:
    """Read each layer's `moe.last_router_logits` / `last_expert_ids` (set by a training-mode
    forward) and return the layer-mean losses and per-layer statistics.

    Raises RuntimeError when a layer has no routing record (the model ran in eval mode).
    """
    balance, zs, per_layer, util = [], [], [], []
    for i, layer in enumerate(layers):
        logits, ids = layer.moe.last_router_logits, layer.moe.last_expert_ids
        if logits is None or ids is None:
            raise RuntimeError(f"layers.{i}.moe has no router record; run the forward in train mode")
        b = load_balancing_loss(logits, ids)
        balance.append(b)
        zs.append(z_loss(logits))
        per_layer.append(b.detach())
        util.append(expert_fractions(ids, logits.shape[-1]))
        layer.moe.last_router_logits = layer.moe.last_expert_ids = None  # free the graph refs
    return RouterLosses(torch.stack(balance).mean(), torch.stack(zs).mean(), per_layer, util)
