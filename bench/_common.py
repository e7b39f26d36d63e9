"""What the bench scripts share: CUDA-event timing, the ceilings a roofline is measured against,
the staged launch-config search, the logits comparison of two runs, and the result JSON's
provenance (git sha, environment) and writer. Scripts import it as `bench._common` (each puts
the repository root on sys.path, so they run from a checkout without an install).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from grok1.golden import rel_l2

# ---- timing --------------------------------------------------------------------------------


def time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median of `reps` CUDA-event timings of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Milliseconds per fn() with `calls` of them captured in one CUDA graph (median of `reps`
    replays): a kernel's own time, as the engine's graph replay sees it, without the Python
    launch cost that per-call events would include for kernels of a few microseconds."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, reps=reps) / calls


def measure_ceilings(device: str = "cuda") -> dict:
    """Copy bandwidth (bytes read + written, 2 GiB device-to-device) and bf16 matmul rate
    (8192^3, random data), medians over 20 timed runs."""
    src = torch.randn(2 << 30 >> 1, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), reps=20)
    nbytes = 2 * src.numel() * src.element_size()
    src = dst = None  # free 4 GiB before the matmul
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_ms = time_ms(lambda: a @ b, reps=20)
    return {"copy_gbps": nbytes / copy_ms / 1e6, "bf16_tflops": 2 * 8192**3 / mm_ms / 1e9}


def staged_sweep(base: dict, stages: list[list[dict]], measure) -> tuple[float, dict] | None:
    """Coordinate search over launch configs (bench/moe.py, bench/linear.py): each stage tries
    its changes on the fastest config of the stages before it (`base` at first); measure(cfg)
    -> ms; a config that fails to compile or launch is reported and skipped. Returns
    (ms, config) of the fastest, or None if none ran."""
    best = None
    for stage in stages:
        start = dict(best[1]) if best else base
        for change in stage:
            cfg = {**start, **change}
            try:
                ms = measure(cfg)
            except Exception as e:  # noqa: BLE001 (a config that does not fit is skipped)
                print(f"{cfg}: failed ({type(e).__name__}: {e})", flush=True)
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
    return best


# ---- comparing two runs ----------------------------------------------------------------------

def compare_logits(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 error, max abs error over max |ref|, argmax agreement per position, and
    `top1_close`: the share of positions whose argmax scores within 1 % of the row's largest
    |ref| of the reference maximum (random models have near-ties that noise may swap)."""
    out2, ref2 = out.flatten(0, -2).float(), ref.flatten(0, -2).float()
    err = out2 - ref2
    picked = ref2.gather(-1, out2.argmax(-1, keepdim=True))[:, 0]
    slack = 1e-2 * ref2.abs().amax(-1)
    return {"rel_l2": rel_l2(out2, ref2),
            "max_abs_rel": float(err.abs().max() / ref2.abs().max()),
            "argmax_agree": float((out2.argmax(-1) == ref2.argmax(-1)).float().mean()),
            "top1_close": float((picked >= ref2.amax(-1) - slack).float().mean())}


# ---- results ---------------------------------------------------------------------------------

def git_sha() -> str | None:
    """The commit the code runs at, for result JSON: GROK1_GIT_SHA when set, else git's HEAD,
    marked "-dirty" when tracked files differ from it. (The device's copy of the working tree
    carries the session's starting .git, so there HEAD names an older commit: dirty says so.)"""
    sha = os.environ.get("GROK1_GIT_SHA")
    if sha:
        return sha

    def git(*args: str) -> str | None:
        r = subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                           cwd=Path(__file__).parent)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return None
    return head and head + ("-dirty" if dirty else "")


def environment() -> dict:
    """Provenance of a GPU measurement: GPU, versions, git sha, command line, time."""
    try:  # the version without importing triton (only grok1.ops may)
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {"gpu": torch.cuda.get_device_name(), "num_gpus": 1, "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "git_sha": git_sha(), "command": " ".join(sys.argv),
            # the kernels' numerics: the reference's (bf16(w * s) weights, f32 expert activations,
            # softmax rounded after normalising); no faster numerics is selectable by the bench
            "numerics": "reference",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat()}


def write_results(results: list[dict], out_dir: Path, prefix: str = "bench") -> Path:
    """`results` as one JSON list in out_dir/<prefix>_<UTC time>.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    path = out_dir / f"{prefix}_{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path
