"""Experiment (the numerics issue, decode speed at the reference's rounding): can the MoE's
gate/up at one pair per expert read int8 weights near copy bandwidth when the dequantized tile
bf16(w * s) is the tensor cores' *right* operand, x [16, K] (one real row) @ W [K, BN], instead of
the GEMV's per-element f32 FMAs (grok1/ops/moe_triton.py moe_gemv_gate_up_kernel, ALU-bound at
the reference's rounding: bench/NOTES.md)? The int8 tile is loaded as stored (N contiguous, 16
bytes a thread), dequantized exactly as the reference (dot_triton.dequant_f32's values), and the
MMA sums the exact bf16 x bf16 products in f32, as XLA's dot does.

Times, in one run on one GPU, at Grok-1's full width (D 6144, F 32768, 2 pairs on 2 experts):
the engine's tuned path (fused_moe's gate/up + down), its gate/up alone is not separable, so
this times the new gate/up kernel against the whole tuned MoE and against the gate/up bytes'
copy roofline, and checks its output against the twin's h. Prints one line per config and
writes JSON (bench/_common.write_results). Not wired into the engine: a measurement first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.language as tl

from bench._common import environment, measure_ceilings, time_graph_ms, write_results
from grok1.ops._triton import interpreting
from grok1.ops.dot_triton import dot, scaled_int8, tanh


@triton.jit
def xw_gate_up_kernel(x_ptr, ids_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, D, F,
                      A: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr):
    """h[p, n] = gelu(bf16(x[p // A] @ bf16(Wg[e] * s))) * bf16(x @ bf16(Wu[e] * s)), e = ids[p];
    one pair per program row, x padded to 16 rows for the MMA (row 0 real). One scale group
    along K (Grok-1's gate/up)."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e64 = tl.load(ids_ptr + p).to(tl.int64)
    tok = p // A
    n = pid_n * BN + tl.arange(0, BN)
    rows = tl.arange(0, 16)
    s_g = tl.load(sg_ptr + e64 * F + n).to(tl.float32)
    s_u = tl.load(su_ptr + e64 * F + n).to(tl.float32)
    c_g = -8388736.0 * s_g
    c_u = -8388736.0 * s_u
    wg_ptr += e64 * D * F
    wu_ptr += e64 * D * F
    acc_g = tl.zeros([16, BN], dtype=tl.float32)
    acc_u = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + tok.to(tl.int64) * D + kk[None, :] + rows[:, None] * 0,
                    mask=(rows[:, None] == 0), other=0.0)
        offs = kk[:, None] * F + n[None, :]
        wg = scaled_int8(tl.load(wg_ptr + offs), s_g[None, :], c_g[None, :]).to(tl.bfloat16)
        acc_g = dot(x, wg, acc_g, F32)
        wu = scaled_int8(tl.load(wu_ptr + offs), s_u[None, :], c_u[None, :]).to(tl.bfloat16)
        acc_u = dot(x, wu, acc_u, F32)
    g = acc_g.to(tl.bfloat16).to(tl.float32)
    u = acc_u.to(tl.bfloat16).to(tl.float32)
    inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))
    h = 0.5 * g * (1.0 + tanh(inner)) * u
    tl.store(h_ptr + p.to(tl.int64) * F + n[None, :] + rows[:, None] * 0, h,
             mask=rows[:, None] == 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from grok1.model import Linear, gelu_glu
    from grok1.ops.moe import fused_moe
    from grok1.quant import INT8

    D, F, E, A = 6144, 32768, 8, 2
    ceil = measure_ceilings()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = [torch.randint(-127, 128, sh, dtype=torch.int8, device="cuda", generator=g)
         for sh in [(E, D, F), (E, D, F), (E, F, D)]]
    s = [(torch.rand(sh, device="cuda", generator=g) * 1e-3 + 1e-4).to(torch.bfloat16)
         for sh in [(E, 1, F), (E, 1, F), (E, 8, D)]]
    x = torch.randn(1, D, device="cuda", generator=g).to(torch.bfloat16)
    ids = torch.tensor([[2, 5]], device="cuda")
    gates = torch.tensor([[0.6, 0.3]], device="cuda")
    whole_ms = time_graph_ms(lambda: fused_moe(x, gates, ids, w[0], s[0], w[1], s[1], w[2], s[2]),
                             calls=10)
    gate_up_bytes = 2 * A * D * F
    roof_gu = gate_up_bytes / ceil["copy_gbps"] / 1e6
    roof_all = 3 * A * D * F / ceil["copy_gbps"] / 1e6
    print(f"tuned fused_moe (gate/up + down): {whole_ms:.3f} ms | roofline {roof_all:.3f} ms "
          f"({100 * roof_all / whole_ms:.0f}%)", flush=True)
    # the twin's h for the check: bf16(w * s) weights, bf16 projections, f32 GELU product
    lins = []
    for i in (0, 1):
        lin = Linear(D, F, experts=E, weights=INT8, quant_groups=1).cuda()
        lin.weight.copy_(w[i])
        lin.scales.copy_(s[i])
        lins.append(lin)
    ref = torch.stack([gelu_glu(lins[0](x, expert=int(e)), lins[1](x, expert=int(e)))[0]
                       for e in ids[0]])
    results = [{"kind": "moe_xw_experiment", "what": "tuned fused_moe, gate/up + down",
                "ms": whole_ms, "roofline_ms": roof_all}]
    h = torch.empty(A, F, dtype=torch.float32, device="cuda")
    ids_flat = ids.reshape(-1).contiguous()
    for BN, BK, warps, stages in [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3),
                                  (128, 128, 8, 4), (256, 64, 8, 4), (64, 256, 4, 3),
                                  (256, 128, 8, 3), (32, 256, 4, 4)]:
        def run(BN=BN, BK=BK, warps=warps, stages=stages):
            xw_gate_up_kernel[(A, triton.cdiv(F, BN))](
                x, ids_flat, w[0], w[1], s[0], s[1], h, D, F, A=A, BN=BN, BK=BK, F32=interpreting(),
                num_warps=warps, num_stages=stages)
        try:
            run()
            err = ((h - ref).norm() / ref.norm()).item()
            ms = time_graph_ms(run, calls=10)
        except Exception as exc:  # a config that does not compile or fit
            print(f"BN={BN} BK={BK} W={warps} S={stages}: failed ({type(exc).__name__})")
            continue
        print(f"xw gate/up BN={BN} BK={BK} W={warps} S={stages}: {ms:.3f} ms | roofline "
              f"{roof_gu:.3f} ms ({100 * roof_gu / ms:.0f}%) | rel err vs twin {err:.2e}",
              flush=True)
        results.append({"kind": "moe_xw_experiment", "what": "xw gate/up", "BN": BN, "BK": BK,
                        "num_warps": warps, "num_stages": stages, "ms": ms,
                        "roofline_ms": roof_gu, "rel_err_vs_twin": err})
    env = environment()
    for r in results:
        r.update(env, ceilings=ceil)
    out = args.out or Path("bench/results") / env["gpu"].replace(" ", "_")
    print(f"wrote {write_results(results, out)}")


if __name__ == "__main__":
    main()
