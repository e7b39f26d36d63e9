"""decode latency on random full-width int8 weights, beside its roofline and the anchors.

Usage: python bench/decode.py [--layers 4] [--out DIR]   (= python bench/engine_bench.py decode)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import main

if __name__ == "__main__":
    main(["decode", *sys.argv[1:]])
