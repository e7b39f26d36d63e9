"""bench/op_diff.py, the per-op comparison of the engine with its twins (the numerics issue), keeps
working: on the CPU the engine runs the twins themselves, so every op of every layer must be
found and sit at distance 0, and the logits must equal the plain model's."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPS = {"attn_norm", "proj.q", "proj.k", "proj.v", "rope.q", "rope.k_cached", "rope.v_cached",
       "attention", "proj.o", "residual_norm.h", "residual_norm.x", "router.gates", "moe"}


def test_op_diff_finds_every_op_of_every_layer_at_distance_zero_on_cpu(golden_dir, tmp_path):
    out = tmp_path / "op_diff.json"
    subprocess.run([sys.executable, "bench/op_diff.py", "--golden", str(golden_dir), "--device",
                    "cpu", "--tokens", "8", "--decode", "1", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if "rel_l2" in r]
    assert set(result["worst_per_op"]) == OPS
    layers = {r["layer"] for r in rows if r["op"] == "moe"}
    assert layers == set(range(11))  # the golden model's 11 layers, prefill and decode
    assert {r["step"] for r in rows} == {"prefill", "decode0"}
    assert all(r["rel_l2"] == 0.0 and r["share_over_1ulp"] == 0.0 for r in rows)
    assert all(r["share"] == 1.0 for r in result["rows"] if r["op"] == "router.same_experts")
    assert [d["rel_l2"] for d in result["logits_vs_plain"]] == [0.0, 0.0]
