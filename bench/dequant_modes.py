"""Which instructions compute the reference's int8 dequantization bf16(w * s) fastest in the
decode GEMVs (ops/dot_triton.dequant_f32 MODE 0 to 3: the same values, asserted bit for bit):
the MoE GEMV at full width and at a 4-GPU shard's width, and the q/k/v GEMV, one row, timed
inside CUDA graphs over weights larger than L2, beside the copy-bandwidth roofline.

    python bench/dequant_modes.py [--out FILE]
"""

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import measure_ceilings, time_graph_ms
from grok1.model import moe_ref
from grok1.ops._triton import device_name
from grok1.ops.linear import quant_gemv
from grok1.ops.moe import fused_moe, moe_config
from moe_numerics import A, D, E, expert_linears

MODES = (0, 1, 2, 3)


def moe_rows(F: int, ceil: dict, g: torch.Generator) -> list[dict]:
    lins = expert_linears(F, g)
    x = torch.randn(1, D, device="cuda", generator=g).to(torch.bfloat16)
    gates, ids = torch.softmax(torch.randn(1, E, device="cuda", generator=g), -1).topk(A, -1)
    ref = moe_ref(x, gates, ids, *lins, out_dtype=torch.float32)
    base = moe_config(A, D, F, E, "int8", device_name(x)).as_dict()
    roof = 2 * 3 * D * F / ceil["copy_gbps"] / 1e6
    rows, outs = [], []
    for mode in MODES:
        cfg = {**base, "DEQUANT": mode}
        wg, wu, wd = lins
        call = functools.partial(fused_moe, x, gates, ids, wg.weight, wg.scales, wu.weight,
                                 wu.scales, wd.weight, wd.scales, cfg, out_dtype=torch.float32)
        outs.append(call())
        ms = time_graph_ms(call, calls=10)
        rows.append({"op": "moe_gemv", "F": F, "mode": mode, "ms": ms, "roofline_ms": roof,
                     "pct_of_roofline": 100 * roof / ms,
                     "rel_err_vs_twin": float((outs[-1] - ref).norm() / ref.norm()),
                     "bit_equal_mode0": bool(torch.equal(outs[-1], outs[0]))})
    return rows


def qkv_rows(ceil: dict, g: torch.Generator) -> list[dict]:
    Ns = [6144, 1024, 1024]
    mats = [(torch.randint(-127, 128, (D, n), generator=g, device="cuda", dtype=torch.int8),
             torch.rand(1, n, generator=g, device="cuda").to(torch.bfloat16) * 1e-3 + 1e-4)
            for n in Ns]
    x = torch.randn(1, D, device="cuda", generator=g).to(torch.bfloat16)
    roof = D * sum(Ns) / ceil["copy_gbps"] / 1e6
    rows, outs = [], []
    for mode in MODES:
        call = functools.partial(quant_gemv, x, mats, config={"DEQUANT": mode})
        outs.append(torch.cat(call(), dim=1))
        ms = time_graph_ms(call, calls=30)
        rows.append({"op": "qkv_gemv", "mode": mode, "ms": ms, "roofline_ms": roof,
                     "pct_of_roofline": 100 * roof / ms,
                     "bit_equal_mode0": bool(torch.equal(outs[-1], outs[0]))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    ceil = measure_ceilings()
    rows = qkv_rows(ceil, g) + moe_rows(32768, ceil, g) + moe_rows(8192, ceil, g)
    gpu = torch.cuda.get_device_name()
    for r in rows:
        r["gpu"] = gpu
        print(f"{r['op']} F={r.get('F', '-')} DEQUANT={r['mode']}: {r['ms']:.3f} ms | roofline "
              f"{r['roofline_ms']:.3f} ms ({r['pct_of_roofline']:.0f}%) | bit-equal to mode 0: "
              f"{r['bit_equal_mode0']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
