"""The MoE's pairs grouped by expert and its grouped matmuls (grok1.moe_dispatch), and moe_ref's
grouped path against its expert-by-expert loop: outputs and gradients, uneven loads with an
expert that gets no token."""

import pytest
import torch

from grok1.config import GrokConfig
from grok1.model import Linear, MoE, moe_ref, route
from grok1.moe_dispatch import group_by_expert, grouped_mm
from tests.conftest import gpu

E, A = 8, 2


def uneven_ids(M: int, g: torch.Generator, empty: int = 5) -> torch.Tensor:
    """[M, A] distinct expert ids per row, skewed towards expert 0, none for expert `empty`."""
    weights = torch.tensor([8.0, 3, 2, 1, 1, 0, 1, 0.5])
    weights = torch.roll(weights, empty - 5)
    return torch.multinomial(weights.expand(M, E), A, generator=g)


def per_expert_products(x_MK, ids_MA, w_EKN):
    """Reference: out[m, a] = x[m] @ w[ids[m, a]], row by row."""
    return torch.stack([torch.stack([x_MK[m] @ w_EKN[ids_MA[m, a]] for a in range(A)])
                        for m in range(x_MK.shape[0])])


def test_group_by_expert_sorts_pairs_stably_and_counts_each_expert():
    g = torch.Generator().manual_seed(11)
    ids = uneven_ids(37, g)
    groups = group_by_expert(ids, E)
    flat = ids.flatten()
    assert groups.counts_E.tolist() == [int((flat == e).sum()) for e in range(E)]
    assert groups.counts_E[5] == 0 and groups.counts_E[0] > groups.counts_E[4]
    assert groups.ends_E.dtype == torch.int32
    assert groups.ends_E.tolist() == torch.cumsum(groups.counts_E, 0).tolist()
    assert torch.equal(groups.experts_P, flat[groups.order_P])
    assert bool((groups.experts_P[1:] >= groups.experts_P[:-1]).all())
    # within an expert the pairs keep token order (the loop's rows), so the rows rise
    same = groups.experts_P[1:] == groups.experts_P[:-1]
    assert bool((groups.rows_P[1:][same] > groups.rows_P[:-1][same]).all())
    assert torch.equal(groups.rows_P, groups.order_P // A)
    assert sorted(groups.order_P.tolist()) == list(range(37 * A))


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("padded", torch.float32), ("padded", torch.float64),
                                           ("segments", torch.float32),
                                           ("segments", torch.float64)])
def test_grouped_mm_backends_equal_per_row_products_and_their_gradients(backend, dtype):
    g = torch.Generator().manual_seed(12)
    M, K, N = 29, 24, 40  # rows of 48..160 bytes: the 16-byte strides torch._grouped_mm needs
    ids = uneven_ids(M, g)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(E, K, N, generator=g, dtype=torch.float64)
    groups = group_by_expert(ids, E)
    x_P = x.to(dtype)[groups.rows_P].detach().requires_grad_()
    w_d = w.to(dtype).requires_grad_()
    out = grouped_mm(x_P, w_d, groups, backend)
    assert out.dtype == dtype and out.shape == (M * A, N)
    ref = per_expert_products(x.to(dtype), ids, w.to(dtype)).flatten(0, 1)[groups.order_P]
    # f64 is exact to 2^-50 here; f32: sums of 24 products; bf16: one rounding of the output
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * 4)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    out.backward(grad_out)
    # d/dw[e] = x_e^T grad_e and d/dx = grad @ w[e]^T, from the math, in f64
    x64, go64 = x_P.detach().double(), grad_out.double()
    for e in range(E):
        rows = groups.experts_P == e
        want = x64[rows].T @ go64[rows]
        torch.testing.assert_close(w_d.grad[e].double(), want, rtol=tol * 4, atol=tol * 8)
    assert bool((w_d.grad[5] == 0).all())  # the expert that got no token
    want_x = torch.einsum("pn,pkn->pk", go64, w[groups.experts_P].to(dtype).double())
    torch.testing.assert_close(x_P.grad.double(), want_x, rtol=tol * 4, atol=tol * 8)


@pytest.mark.parametrize("backend", ["torch", "padded", "segments"])
def test_grouped_mm_takes_a_broadcast_gradient(backend):
    """out.sum()'s gradient is a stride-0 broadcast, which torch._grouped_mm's own backward
    refuses; d(sum)/dx[p] = sum over n of w[e_p][:, n]."""
    g = torch.Generator().manual_seed(17)
    ids = uneven_ids(9, g)
    groups = group_by_expert(ids, E)
    x = torch.randn(9 * A, 16, generator=g, requires_grad=True)
    w = torch.randn(E, 16, 8, generator=g, requires_grad=True)
    grouped_mm(x, w, groups, backend).sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(-1)[groups.experts_P])
    assert bool((w.grad[5] == 0).all())


def test_unknown_backend_is_refused_by_name():
    groups = group_by_expert(torch.tensor([[0, 1]]), E)
    with pytest.raises(ValueError, match="backend='cutlass'"):
        grouped_mm(torch.randn(2, 8), torch.randn(E, 8, 8), groups, "cutlass")


def expert_linears(D: int, F: int, dtype: torch.dtype, g: torch.Generator):
    linears = [Linear(D, F, experts=E, dtype=dtype), Linear(D, F, experts=E, dtype=dtype),
               Linear(F, D, experts=E, dtype=dtype)]
    with torch.no_grad():
        for lin in linears:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    return linears


def moe_inputs(M: int, D: int, compute: torch.dtype, g: torch.Generator):
    x = torch.randn(M, D, generator=g).to(compute)
    gates = torch.softmax(torch.randn(M, E, generator=g), -1).topk(A).values
    return x, gates, uneven_ids(M, g)


def run_moe(x, gates, ids, linears, probe=None, **kw):
    """Output and gradients (x, gates, weights) of `probe` (default: random) . the output."""
    x = x.detach().requires_grad_()
    gates = gates.detach().requires_grad_()
    for lin in linears:
        lin.weight.grad = None
    out = moe_ref(x, gates, ids, *linears, **kw)
    if probe is None:
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    (out.float() * probe).sum().backward()
    return out, [x.grad, gates.grad] + [lin.weight.grad for lin in linears]


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rounding", ["jax", "sglang"])
@pytest.mark.parametrize("backend", [None, "padded"])
def test_grouped_moe_equals_the_expert_loop_outputs_and_gradients(compute, rounding, backend):
    """On the CPU both take their products in f64 (model.wide_dtype) and round them the same
    way, on the same rows in the same order, so they agree bit for bit; the one expert with no
    token gets a zero gradient in both."""
    g = torch.Generator().manual_seed(13)
    D, F, M = 48, 64, 23
    linears = expert_linears(D, F, torch.float32, g)  # f32 master weights, as training's
    x, gates, ids = moe_inputs(M, D, compute, g)
    loop, loop_grads = run_moe(x, gates, ids, linears, rounding=rounding, backend="loop")
    grouped, grads = run_moe(x, gates, ids, linears, rounding=rounding, backend=backend)
    assert grouped.dtype == compute and torch.equal(grouped, loop)
    for got, want in zip(grads, loop_grads):
        assert torch.equal(got, want)
    for lin in linears:
        assert bool((lin.weight.grad[5] == 0).all()) and lin.weight.grad[0].abs().sum() > 0


def test_bf16_down_projection_is_within_its_stated_bound_of_the_reference():
    """expert_down "bf16" rounds the GELU product (2^-9 relative) and each slot's down output
    (2^-9) before the f32 gated sum: two more roundings than the reference's one, so the
    output's relative L2 error stays within 3 x 2^-9 (measured about 1.7 x). Its backward
    rounds two more (the down output's gradient and the GELU product's): gradients within
    4 x 2^-9 (measured up to 2.6 x)."""
    g = torch.Generator().manual_seed(14)
    D, F, M = 48, 256, 64
    linears = expert_linears(D, F, torch.float32, g)
    x, gates, ids = moe_inputs(M, D, torch.bfloat16, g)
    ref, ref_grads = run_moe(x, gates, ids, linears)
    fast, grads = run_moe(x, gates, ids, linears, down="bf16")

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm())

    assert 0 < rel(fast, ref) < 3 * 2.0 ** -9
    for got, want in zip(grads, ref_grads):
        assert 0 < rel(got, want) < 4 * 2.0 ** -9
    with pytest.raises(ValueError, match="down='f16'"):
        moe_ref(x, gates, ids, *linears, down="f16")


def test_grouped_paths_run_with_no_host_read():
    """On the meta device no tensor can be read back (.item(), .tolist(), nonzero raise), so a
    forward and backward there show the grouped path needs none: what a GPU runs unsynced."""
    config = GrokConfig.preset("tiny")
    with torch.device("meta"):
        moe = MoE(config, None, torch.float32, expert_down="bf16")
        x = torch.randn(3, 5, config.emb_size, dtype=torch.bfloat16, requires_grad=True)
    xm = x.reshape(-1, config.emb_size)
    _, gates, ids = route(xm, moe.router, moe.top_k)
    out = moe_ref(xm, gates, ids, moe.w_gate, moe.w_up, moe.w_down, down="bf16",
                  backend="padded")
    out.float().sum().backward()
    assert out.shape == xm.shape and moe.w_down.weight.grad.shape == moe.w_down.weight.shape
    with pytest.raises((RuntimeError, NotImplementedError)):  # the loop does read the ends
        moe_ref(xm, gates, ids, moe.w_gate, moe.w_up, moe.w_down, backend="loop")
    # the torch backend's own steps read nothing back either (its CUDA kernel: the gpu test)
    groups = group_by_expert(ids, config.num_experts)
    w = moe.w_gate.weight.to(torch.bfloat16)
    grouped_mm(xm.index_select(0, groups.rows_P), w, groups, "torch").sum().backward()
    assert moe.w_gate.weight.grad.shape == moe.w_gate.weight.shape


def test_moe_module_records_the_router_while_training_and_refuses_unknown_numerics():
    config = GrokConfig.preset("tiny")
    moe = MoE(config, None, torch.float32, expert_down="bf16")
    g = torch.Generator().manual_seed(15)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(2, 7, config.emb_size, generator=g).to(torch.bfloat16)
    moe.train()
    out = moe(x)
    xm = x.reshape(-1, config.emb_size)
    logits, gates, ids = route(xm, moe.router, moe.top_k)
    assert torch.equal(moe.last_router_logits, logits) and torch.equal(moe.last_expert_ids, ids)
    assert torch.equal(out.reshape(xm.shape), moe_ref(xm, gates, ids, moe.w_gate, moe.w_up,
                                                      moe.w_down, down="bf16", backend="loop"))
    with pytest.raises(ValueError, match="expert_down='fp8'"):
        MoE(config, None, torch.float32, expert_down="fp8")


@gpu
@pytest.mark.parametrize("down", ["f32", "bf16"])
def test_grouped_moe_on_cuda_matches_the_loop_and_bf16_never_syncs(down):
    """On a GPU the grouped path runs torch._grouped_mm (bf16: CUTLASS on Hopper), the loop
    cuBLAS per expert: the same roundings, f32 sums in other orders, so outputs agree within
    one bf16 ulp of the largest |value| (2^-7 of it) and gradients to 1e-2 relative; with down
    "bf16" the forward and backward run with CUDA's sync debug mode raising on any host sync."""
    g = torch.Generator().manual_seed(16)
    D, F, M = 256, 512, 1000
    linears = [lin.cuda() for lin in expert_linears(D, F, torch.float32, g)]
    x, gates, ids = (t.cuda() for t in moe_inputs(M, D, torch.bfloat16, g))
    probe = torch.randn(M, D, generator=g).cuda()  # (copied before the sync check)
    loop, loop_grads = run_moe(x, gates, ids, linears, probe, down=down, backend="loop")
    torch.cuda.synchronize()
    if down == "bf16":
        torch.cuda.set_sync_debug_mode("error")
    try:
        grouped, grads = run_moe(x, gates, ids, linears, probe, down=down)
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scale = loop.float().abs().max()
    assert float((grouped.float() - loop.float()).abs().max()) <= 2.0 ** -7 * scale
    for got, want in zip(grads, loop_grads):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    assert bool((linears[0].weight.grad[5] == 0).all())

