"""Ceilings measured on this GPU (copy bandwidth, bf16 matmul rate) and the rooflines they give
for the 4-layer full-width config. The measurement, roofline arithmetic and JSON writer live in
grok1.engine.bench_cli (so `grok1 bench` has them too); this script prints them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grok1.config import GrokConfig
from grok1.engine.bench_cli import decode_roofline_ms, measure_ceilings, prefill_roofline_ms

if __name__ == "__main__":
    ceilings = measure_ceilings()
    c = GrokConfig.preset("grok-1").replace(num_layers=4)
    print(f"copy {ceilings['copy_gbps']:.0f} GB/s, bf16 {ceilings['bf16_tflops']:.0f} TFLOP/s")
    for b in (1, 8, 32, 64, 128):
        print(f"decode b={b} ctx=512: roofline {decode_roofline_ms(c, b, 512, ceilings):.3f} ms")
    for t in (1024, 4096):
        print(f"prefill T={t}: roofline {prefill_roofline_ms(c, t, ceilings):.2f} ms")
