"""Triton kernels of grok1.ops.router."""

import triton
import triton.language as tl

from grok1.ops.dot_triton import div, tanh


@triton.jit
def router_logits_kernel(x_ptr, r_ptr, part_ptr, M, D, E, K_PER_SPLIT, E_PAD: tl.constexpr,
                         BK: tl.constexpr):
    """part[split, m, e] = sum over this split's k of f32(x[m, k]) * router[k, e];
    grid (M, SPLIT); x [M, D] bf16, router [D, E] f32, part [SPLIT, M, E_PAD] f32."""
    m = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    e = tl.arange(0, E_PAD)
    e_ok = e < E
    acc = tl.zeros([BK, E_PAD], dtype=tl.float32)
    k_lo = sp * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, D)
    for k0 in range(k_lo, k_hi, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < k_hi
        x = tl.load(x_ptr + m * D + k, mask=k_ok, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + k[:, None] * E + e[None, :], mask=k_ok[:, None] & e_ok[None, :],
                    other=0.0)
        acc += x[:, None] * r
    tl.store(part_ptr + (sp * M + m) * E_PAD + e, tl.sum(acc, 0))


@triton.jit
def router_topk_kernel(part_ptr, logits_ptr, gates_ptr, ids_ptr, M, E, SPLIT: tl.constexpr,
                       E_PAD: tl.constexpr, A: tl.constexpr, CAP: tl.constexpr):
    """One row: logits = the sum of the splits (capped to CAP * tanh(logits / CAP) unless CAP is
    0, as model.softcap_f32); softmax over the E experts; the A largest probabilities in
    descending order (ties: the lower id first) and their expert ids."""
    m = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_PAD)
    e_ok = e < E
    logits = tl.zeros([E_PAD], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        logits += tl.load(part_ptr + (s * M + m) * E_PAD + e)
    if CAP != 0.0:
        logits = CAP * tanh(div(logits, CAP))
    tl.store(logits_ptr + m * E + e, logits, mask=e_ok)
    z = tl.where(e_ok, logits, float("-inf"))
    p = tl.exp(z - tl.max(z, 0))
    p = p / tl.sum(p, 0)
    for a in tl.static_range(A):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, E_PAD), 0)
        tl.store(gates_ptr + m * A + a, best)
        tl.store(ids_ptr + m * A + a, idx.to(tl.int64))
        p = tl.where(e == idx, -1.0, p)
