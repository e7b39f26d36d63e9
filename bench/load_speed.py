"""Loading speed of a release checkpoint on this machine, beside the disk's own speed (issue 15).

    python bench/load_speed.py [--checkpoint DIR --config JSON] [--experts 2] [--reps 3]

Without --checkpoint it writes a synthetic release checkpoint (ckpt-0/tensorNNNNN_000 pickles,
as xai-org/grok-1's checkpoint.py writes them) of one full-width Grok-1 layer under --workdir,
with --experts experts instead of 8 so that it fits this machine's disk and memory (2 experts:
4.5 GB of files, of which the f32 embedding is 3.2 GB; 8 experts: 8.1 GB, the issue's case).
In the same run it measures, in this order:
- raw read bandwidth: every file read with O_DIRECT (no page cache), one stream as `dd
  iflag=direct` reads, and 8 threads at once; the better is the disk's ceiling;
- a cold buffered read of every file (as `cat`), after posix_fadvise(DONTNEED);
- grok1.load cold (after posix_fadvise(DONTNEED) on every file) and warm (files cached), each
  in a fresh child process that reports its time and peak RSS (VmHWM) beside the loaded
  model's bytes and the RSS it had before loading (the interpreter, torch and grok1).
Each figure is printed beside its target (cold >= 80 % of raw, warm >= 3 GB/s, peak RSS above
the baseline <= 1.1 x the model) and all go to bench/results/cpu/load_speed_<cpu>_<time>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import mmap
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

COLD_TARGET = 0.8  # of the raw read bandwidth
WARM_TARGET_GBPS = 3.0
RSS_TARGET = 1.1  # peak RSS above the baseline, over the loaded model's bytes
_BLOCK = 16 << 20  # O_DIRECT / buffered read size


# ---- the checkpoint ------------------------------------------------------------------------------

def bench_config(experts: int):
    from grok1.config import GrokConfig

    return GrokConfig.preset("grok-1").replace(num_layers=1, num_experts=experts)


def write_checkpoint(folder: Path, experts: int, seed: int = 0) -> None:
    """A release checkpoint of bench_config(experts), as the reference writes one."""
    from helpers_ckpt import write_release_checkpoint

    write_release_checkpoint(folder, bench_config(experts), seed)
    os.sync()


def checkpoint_files(folder: Path) -> list[Path]:
    from grok1.checkpoint.xai_pickle import resolve_ckpt0

    return sorted(p for p in resolve_ckpt0(folder).iterdir() if p.is_file())


def drop_cache(files: list[Path]) -> None:
    """Evict the files' pages from the page cache (works without root for clean pages)."""
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the disk's speed ----------------------------------------------------------------------------

def _read_file(path: Path, direct: bool) -> int:
    """Bytes read from `path` in _BLOCK reads (O_DIRECT: into a page-aligned buffer, as dd)."""
    buf = mmap.mmap(-1, _BLOCK)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    total = 0
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
        buf.close()
    return total


def read_gbps(files: list[Path], *, direct: bool, threads: int) -> float:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda p: _read_file(p, direct), files))
    return total / (time.perf_counter() - t0) / 1e9


def fresh_memory_gbps(nbytes: int = 1 << 30) -> float:
    """How fast this machine hands out memory never touched before (page faults and zeroing,
    then one write): the floor under any load that writes the model into its own memory."""
    import torch

    t0 = time.perf_counter()
    torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    return nbytes / (time.perf_counter() - t0) / 1e9


# ---- grok1.load in a child process ---------------------------------------------------------------

def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child_load(folder: Path, experts: int) -> dict:
    """Run in the child: load once, report time and memory."""
    import torch

    import grok1

    config = bench_config(experts)
    baseline = _status_bytes("VmRSS")
    anon_before = _status_bytes("RssAnon")
    t0 = time.perf_counter()
    model = grok1.load(folder, config=config, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"seconds": seconds, "peak_rss_bytes": _status_bytes("VmHWM"),
            "baseline_rss_bytes": baseline, "model_bytes": model_bytes,
            # the model's own memory (written by the load) vs its files' pages (mapped)
            "anon_bytes": _status_bytes("RssAnon") - anon_before,
            "file_mapped_bytes": _status_bytes("RssFile"),
            "threads": torch.get_num_threads()}


def load_in_child(folder: Path, experts: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--experts",
                          str(experts)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the run -------------------------------------------------------------------------------------

def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="an existing release checkpoint folder")
    ap.add_argument("--experts", type=int, default=2, help="experts of the synthetic layer")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--reps", type=int, default=3, help="cold and warm loads each")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_load(args.child, args.experts)))
        return
    made = args.checkpoint is None
    folder = args.checkpoint or args.workdir / f"grok1_load_speed_{args.experts}e"
    if made and not (folder / "ckpt-0").is_dir():
        print(f"writing a 1-layer full-width checkpoint with {args.experts} experts to {folder}",
              flush=True)
        subprocess.run([sys.executable, "-c", "import sys; sys.argv[1:]=[]; "
                        f"sys.path[:0]={[str(REPO), str(REPO / 'tests')]!r}; "
                        "from bench.load_speed import write_checkpoint; from pathlib import Path; "
                        f"write_checkpoint(Path({str(folder)!r}), {args.experts})"], check=True)
    files = checkpoint_files(folder)
    file_bytes = sum(p.stat().st_size for p in files)
    gb = file_bytes / 1e9
    load_avg = os.getloadavg()

    raw = {"direct_1_stream_gbps": read_gbps(files, direct=True, threads=1),
           "direct_8_threads_gbps": read_gbps(files, direct=True, threads=8)}
    raw_gbps = max(raw.values())
    drop_cache(files)
    raw["cold_buffered_gbps"] = read_gbps(files, direct=False, threads=1)
    fresh_gbps = statistics.median(fresh_memory_gbps() for _ in range(3))
    cold, warm = [], []
    for _ in range(args.reps):
        drop_cache(files)
        cold.append(load_in_child(folder, args.experts))
    load_in_child(folder, args.experts)  # every file cached
    for _ in range(args.reps):
        warm.append(load_in_child(folder, args.experts))

    def gbps(runs: list[dict]) -> list[float]:
        return [file_bytes / r["seconds"] / 1e9 for r in runs]

    cold_gbps, warm_gbps = gbps(cold), gbps(warm)
    runs = cold + warm
    model_bytes = runs[0]["model_bytes"]
    rss_over = max((r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / model_bytes for r in runs)
    peak_over = max(r["peak_rss_bytes"] / model_bytes for r in runs)
    result = {
        "what": "load_speed", "cpu": cpu_name(), "cores": os.cpu_count(),
        "checkpoint": "synthetic" if made else str(folder), "experts": args.experts,
        "layers": 1, "file_bytes": file_bytes, "model_bytes": model_bytes,
        "load_avg_at_start": load_avg, "raw": raw, "raw_gbps": raw_gbps,
        "cold_gbps": cold_gbps, "cold_gbps_median": statistics.median(cold_gbps),
        "warm_gbps": warm_gbps, "warm_gbps_median": statistics.median(warm_gbps),
        "cold_vs_raw": statistics.median(cold_gbps) / raw_gbps,
        "fresh_memory_gbps": fresh_gbps,
        # a warm load cannot beat writing its own (anonymous) memory at the fresh-memory rate
        "warm_ceiling_gbps": file_bytes / 1e9 / (statistics.median(r["anon_bytes"] for r in warm)
                                                 / (fresh_gbps * 1e9)),
        "peak_rss_over_model": peak_over, "peak_rss_above_baseline_over_model": rss_over,
        "runs": {"cold": cold, "warm": warm},
        "targets": {"cold_vs_raw": COLD_TARGET, "warm_gbps": WARM_TARGET_GBPS,
                    "peak_rss_above_baseline_over_model": RSS_TARGET},
        "torch_threads": runs[0]["threads"],
        "python": platform.python_version(), "command": " ".join(sys.argv),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    from bench._common import git_sha, write_results

    result["git_sha"] = git_sha()
    import torch

    result["torch"] = torch.__version__

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(f"checkpoint {gb:.2f} GB ({len(files)} files), model {model_bytes / 1e9:.2f} GB; "
          f"{result['cpu']}, {os.cpu_count()} cores, load average {load_avg[0]:.1f}")
    print(f"raw O_DIRECT read: {raw['direct_1_stream_gbps']:.2f} GB/s one stream, "
          f"{raw['direct_8_threads_gbps']:.2f} GB/s 8 threads; cold buffered "
          f"{raw['cold_buffered_gbps']:.2f} GB/s")
    med = result["cold_gbps_median"]
    print(f"grok1.load cold: {med:.2f} GB/s median (best {max(cold_gbps):.2f}) | target "
          f">= {COLD_TARGET * raw_gbps:.2f} (80 % of raw {raw_gbps:.2f}): "
          f"{result['cold_vs_raw']:.0%} {mark(result['cold_vs_raw'] >= COLD_TARGET)}")
    wmed = result["warm_gbps_median"]
    print(f"grok1.load warm: {wmed:.2f} GB/s median (best {max(warm_gbps):.2f}) | target "
          f">= {WARM_TARGET_GBPS:.1f} {mark(wmed >= WARM_TARGET_GBPS)} | ceiling "
          f"{result['warm_ceiling_gbps']:.2f}: it writes "
          f"{statistics.median(r['anon_bytes'] for r in warm) / 1e9:.2f} GB of fresh memory, "
          f"which this machine fills at {fresh_gbps:.2f} GB/s")
    base = max(r["baseline_rss_bytes"] for r in runs)
    print(f"peak RSS: {max(r['peak_rss_bytes'] for r in runs) / 1e9:.2f} GB = {peak_over:.2f} x "
          f"the model; above the {base / 1e9:.2f} GB baseline {rss_over:.2f} x | target <= "
          f"{RSS_TARGET} {mark(rss_over <= RSS_TARGET)}")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", result["cpu"]).strip("_")
    path = write_results([result], args.out, prefix=f"load_speed_{slug}")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    if made and not args.keep:
        import shutil

        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
