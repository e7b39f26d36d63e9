"""prefill latency on random full-width int8 weights, beside its roofline and the anchors.

Usage: python bench/prefill.py [--layers 4] [--out DIR]   (same as `grok1 bench prefill`)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grok1.engine.bench_cli import add_bench_args, run_bench

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_bench_args(p)
    run_bench(p.parse_args(["prefill", *sys.argv[1:]]))
