"""The GPU gate: every GPU test, and the engine on the public golden cases (Grok-1's and
Grok-2's) through the paged cache (prefill and decode, CUDA graphs) under their README's bounds; multi-GPU tests run inside
`pytest -m gpu` when 2 or more GPUs are present. Writes one JSON (kind "gate") and exits non-zero
unless every test passed and the golden bounds hold.

    bash bench/run_device.sh gate        # on the device; the JSON lands in $OUT
    GROK1_GIT_SHA=$(git rev-parse HEAD) python bench/gate.py --out DIR

Any change to GPU code is resolved only after this passes at the final commit, its JSON in
bench/results/ (README, "Contributing").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "grok1" / "golden"
GOLDEN2 = REPO.parent / "shared" / "grok2" / "golden"
sys.path.insert(0, str(REPO))  # run as a script from a checkout without an install


def run_gpu_tests(out: Path, timeout_s: int) -> dict:
    """`pytest -m gpu tests`: counts from its JUnit XML, and the failing tests' names."""
    xml = out / "gate_pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", f"--junitxml={xml}",
           "-p", "no:cacheprovider"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                          env=dict(os.environ, NCCL_NVLS_ENABLE="0",
                                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    (out / "gate_pytest.log").write_text(proc.stdout + proc.stderr)
    print(proc.stdout[-4000:], flush=True)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    counts["pytest_exit"] = proc.returncode
    counts["tests_s"] = round(time.time() - t0, 1)
    return counts


def golden_through_engine(golden: Path) -> dict:
    import grok1
    from grok1.engine.golden import engine_golden_pairs, engine_runner
    from grok1.golden import golden_metrics, golden_pairs, golden_pass, load_cases

    cases = load_cases(golden)
    load = lambda: grok1.load(golden / "checkpoint", config=golden / "config.json",  # noqa: E731
                              device="cuda")
    engine = golden_metrics(engine_golden_pairs(engine_runner(load()), cases))
    plain = golden_metrics(golden_pairs(load(), cases))
    return {"golden_engine": engine, "golden_plain_model": plain,
            "golden_ok": golden_pass(engine) and golden_pass(plain)}


def grok2_golden_through_engine(golden: Path, device: str = "cuda") -> dict:
    """The Grok-2 golden (SGLang's logits) through the engine's prefill and decode paths, and
    the plain bf16 model, under its README's bf16 bounds."""
    import numpy as np

    import grok1
    from grok1.engine.golden import engine_rows_logits, engine_runner
    from grok1.golden import grok2_bf16_pass, grok2_figures

    case = np.load(golden / "golden.npz")
    tokens, logits = torch.from_numpy(case["tokens"]), torch.from_numpy(case["logits"])
    prefill, decode = engine_rows_logits(engine_runner(grok1.load(golden, device=device)), tokens)
    with torch.no_grad():
        plain = grok1.load(golden, device=device)(tokens.to(device)).float().cpu()
    figures = {"engine_prefill": grok2_figures(prefill, logits),
               "engine_decode": grok2_figures(decode, logits),
               "plain_model": grok2_figures(plain, logits)}
    return {"golden_grok2": figures,
            "golden_grok2_ok": all(grok2_bf16_pass(f) for f in figures.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/grok1_out")))
    p.add_argument("--golden", type=Path, default=GOLDEN)
    p.add_argument("--golden2", type=Path, default=GOLDEN2)
    p.add_argument("--tests-timeout", type=int, default=420)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from bench._common import git_sha

    result = {"kind": "gate", "git_sha": git_sha(), "gpu": torch.cuda.get_device_name(),
              "num_gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "time": time.strftime("%Y%m%dT%H%M%S", time.gmtime())}
    result.update(golden_through_engine(args.golden))
    result.update(grok2_golden_through_engine(args.golden2))
    print(json.dumps({k: result[k] for k in ("golden_engine", "golden_plain_model",
                                             "golden_grok2")}), flush=True)
    result.update(run_gpu_tests(args.out, args.tests_timeout))
    result["ok"] = (result["golden_ok"] and result["golden_grok2_ok"] and result["failed"] == 0
                    and result["pytest_exit"] == 0)
    name = f"gate_{result['num_gpus']}gpu_{result['time']}.json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    print(f"gate: {'PASSED' if result['ok'] else 'FAILED'}: {result['passed']} passed, "
          f"{result['failed']} failed, {result['skipped']} skipped; golden_ok "
          f"{result['golden_ok']}, golden_grok2_ok {result['golden_grok2_ok']} -> {name}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
