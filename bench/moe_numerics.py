"""What faithfulness to the reference's int8 rounding costs in the fused MoE: each path timed
(inside a CUDA graph for decode sizes) beside its distance from the twin (model.moe_ref, the
reference's bf16(w * s) weights). Every path dequantizes as the reference by default; the grouped
GEMM's explicit opt-in `exact_int8_products` (int8 products, each group's sum scaled) is timed
beside it at prefill sizes, and the GEMV beside the grouped GEMM at decode sizes. Full width and
the 4-GPU shard's width; random int8 weights; tuned configs otherwise. Prints one line per case
beside its roofline and writes them as JSON (--out)."""

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import measure_ceilings, time_graph_ms, time_ms
from grok1.model import Linear, moe_ref
from grok1.ops._triton import device_name
from grok1.ops.moe import fused_moe, moe_config

D, E, A = 6144, 8, 2


def expert_linears(F: int, g: torch.Generator) -> list[Linear]:
    """gate, up [E, D, F] (one scale group) and down [E, F, D] (8 groups), random int8."""
    out = []
    for d_in, d_out, groups in [(D, F, 1), (D, F, 1), (F, D, 8)]:
        with torch.device("cuda"):
            lin = Linear(d_in, d_out, experts=E, quant_groups=groups)
        lin.weight.copy_(torch.randint(-127, 128, lin.weight.shape, generator=g, device="cuda",
                                       dtype=torch.int8))
        lin.scales.copy_(torch.rand(lin.scales.shape, generator=g, device="cuda") * 1e-3 + 1e-4)
        out.append(lin)
    return out


def run_case(x, gates, ids, lins: list[Linear], cfg: dict, exact: bool) -> torch.Tensor:
    wg, wu, wd = lins
    return fused_moe(x, gates, ids, wg.weight, wg.scales, wu.weight, wu.scales, wd.weight,
                     wd.scales, cfg, out_dtype=torch.float32, exact_int8_products=exact)


def sweep_width(F: int, tokens: list[int], ceil: dict, g: torch.Generator) -> list[dict]:
    lins = expert_linears(F, g)
    rows = []
    for M in tokens:
        x = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16)
        gates, ids = torch.softmax(torch.randn(M, E, device="cuda", generator=g), -1).topk(A, -1)
        ref = moe_ref(x, gates, ids, *lins, out_dtype=torch.float32)
        base = moe_config(M * A, D, F, E, "int8", device_name(x)).as_dict()
        if M * A <= base["GEMV"]:
            variants = [("gemv", True, base), ("grouped_gemm", True, {**base, "GEMV": 0})]
        else:
            variants = [("grouped_gemm", True, base), ("grouped_gemm", False, base)]
        nbytes = ids.unique().numel() * 3 * D * F
        roof = max(nbytes / ceil["copy_gbps"] / 1e6,
                   2 * M * A * 3 * D * F / ceil["bf16_tflops"] / 1e9)
        for path, faithful, cfg in variants:
            call = functools.partial(run_case, x, gates, ids, lins, cfg, not faithful)
            err = float((call() - ref).norm() / ref.norm())
            ms = time_graph_ms(call, calls=10) if M <= 64 else time_ms(call, reps=10)
            row = {"gpu": torch.cuda.get_device_name(), "F": F, "tokens": M, "path": path,
                   "reference_rounding": faithful, "config": cfg, "ms": ms, "roofline_ms": roof,
                   "pct_of_roofline": 100 * roof / ms, "rel_err_vs_twin": err}
            rows.append(row)
            print(f"F={F} M={M} {path} ({'reference rounding' if faithful else 'exact products'})"
                  f": {ms:.3f} ms | roofline {roof:.3f} ms ({row['pct_of_roofline']:.0f}%) | vs "
                  f"twin {err:.2e}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--widths", type=int, nargs="+", default=[32768, 8192])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    ceil = measure_ceilings()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = [r for F in args.widths for r in sweep_width(F, args.tokens, ceil, g)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
