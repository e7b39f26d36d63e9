"""The attention projections' GEMV (decode at batch 1: q/k/v in one launch, then o) at the
shapes of 1, 2, 4 and 8 tensor-parallel ranks: time per launch config, beside its roofline
(weight bytes / copy bandwidth measured in the same run). Times are per call inside a CUDA graph
(as the engine replays them), cycling through copies of the weights larger than L2 so every call
reads HBM. Writes the fastest config per shape in the grok1/ops/configs/linear.json format
(--tuned-out; the layout in grok1/ops/tile_config.py) and every measurement as JSON (--out)."""

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import measure_ceilings, staged_sweep, time_graph_ms
from grok1.ops._triton import device_name
from grok1.ops.linear import quant_gemv
from grok1.ops.tile_config import CONFIG_DIR, GemvTiles, gemv_key

D, Q, KV, O_GROUPS = 6144, 6144, 1024, 8  # Grok-1: q heads 48 x 128, kv heads 8 x 128
TILES = [{"BN": bn, "BK": bk, "W": w, "MMA": 0} for bn, bk, w in [
    (128, 32, 4), (64, 32, 2), (64, 64, 4), (128, 16, 2), (128, 64, 8), (256, 16, 4),
    (256, 32, 8), (64, 16, 1), (128, 32, 2)]] + [
    # the products on the tensor cores (GemvTiles.MMA), as the MoE's GMMA GEMV
    {"BN": bn, "BK": bk, "W": w, "S": st, "MMA": 1} for bn, bk, w, st in [
        (128, 64, 4, 4), (128, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4), (256, 64, 8, 4),
        (128, 64, 4, 2)]]
PROGRAMS = [132, 264, 528, 1056, 2112]
L2_BYTES = 256 << 20  # rotate through at least this much weight (H100 L2: 50 MB)


def shapes(tp: int) -> list[tuple[int, list[int], int]]:
    """(K, Ns, G) of the q/k/v launch and the o launch on one of `tp` ranks (KV heads are
    replicated past 8 ranks, so a rank keeps at least one)."""
    kv = max(KV // tp, 128)
    return [(D, [Q // tp, kv, kv], 1), (Q // tp, [D], max(1, O_GROUPS // tp))]


def time_rotating(x: torch.Tensor, mats: list, cfg: dict) -> float:
    """ms per quant_gemv call, one call per weight copy captured in one CUDA graph."""
    copies = itertools.cycle(mats)
    return time_graph_ms(lambda: quant_gemv(x, next(copies), config=cfg), calls=len(mats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--tuned-out", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON list of every measurement")
    args = p.parse_args()
    ceil = measure_ceilings()
    g = torch.Generator(device="cuda").manual_seed(0)
    tuned, rows = {}, []
    for tp in args.tp:
        for K, Ns, G in shapes(tp):
            nbytes = sum(K * n + 2 * G * n for n in Ns)
            copies = max(1, -(-L2_BYTES // nbytes))
            mats = [[(torch.randint(-127, 128, (K, n), dtype=torch.int8, device="cuda", generator=g),
                      (torch.rand(G, n, device="cuda", generator=g) * 1e-2).to(torch.bfloat16))
                     for n in Ns] for _ in range(copies)]
            x = torch.randn(1, K, device="cuda", generator=g).to(torch.bfloat16)
            roof_ms = nbytes / ceil["copy_gbps"] / 1e6
            key = gemv_key(K, Ns)

            def measure(cfg, x=x, mats=mats, tp=tp, key=key, roof_ms=roof_ms):
                ms = time_rotating(x, mats, cfg)
                pct = 100 * roof_ms / ms
                print(f"tp={tp} {key} {cfg}: {1e3 * ms:.1f} us | roofline {1e3 * roof_ms:.1f} us "
                      f"({pct:.0f}%)", flush=True)
                rows.append({"gpu": torch.cuda.get_device_name(), "tp": tp, "key": key,
                             "config": cfg, "us": 1e3 * ms, "roofline_us": 1e3 * roof_ms,
                             "pct_of_roofline": pct, "copy_gbps": ceil["copy_gbps"]})
                return ms
            defaults = GemvTiles().as_dict()
            best = staged_sweep(dict(defaults), [TILES, [{"PROGRAMS": n} for n in PROGRAMS]],
                                measure)
            if best:  # one row (M = 1), the keys that differ from the defaults
                tuned[key] = {"1": {k: v for k, v in best[1].items() if defaults[k] != v}}
                print(f"best {key}: {1e3 * best[0]:.1f} us = {100 * roof_ms / best[0]:.0f}% of "
                      f"roofline, {tuned[key]['1']}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.tuned_out:
        path = CONFIG_DIR / "linear.json"
        table = json.loads(path.read_text()) if path.exists() else {}
        table.setdefault(device_name(x).split("|")[1], {}).update(tuned)
        args.tuned_out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
