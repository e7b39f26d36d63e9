"""Ceilings measured on this GPU (copy bandwidth, bf16 matmul rate) and the rooflines they give
for the 4-layer full-width config. The measurement lives in bench/_common.py and the roofline
arithmetic in bench/engine_bench.py (whose figures stand beside them); this script prints them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import measure_ceilings
import torch

from bench.engine_bench import bench_config, decode_roofline_ms, prefill_roofline_ms
from grok1.model import Grok1

if __name__ == "__main__":
    ceilings = measure_ceilings()
    with torch.device("meta"):  # sizes only
        c = Grok1(bench_config(4), quantized=True)
    print(f"copy {ceilings['copy_gbps']:.0f} GB/s, bf16 {ceilings['bf16_tflops']:.0f} TFLOP/s")
    for b in (1, 8, 32, 64, 128):
        print(f"decode b={b} ctx=512: roofline {decode_roofline_ms(c, b, 512, ceilings):.3f} ms")
    for t in (1024, 4096):
        print(f"prefill T={t}: roofline {prefill_roofline_ms(c, t, ceilings):.2f} ms")
