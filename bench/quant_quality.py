"""Quality of grok1's weight formats on the CPU: int8 (the release), int4 (groups 128, 64), fp8.

    python bench/quant_quality.py [--val-tokens DIR] [--val-windows 40]

Every model is made the way a user makes it: `grok1.checkpoint.convert.convert` from the int8
checkpoint (the embedded model: from its bf16 weights), loaded by `load_sharded_native`, run by
the plain model (the reference numerics). Three measurements:
- golden: the golden checkpoint (../shared/grok1/golden, a random 11-layer Grok-1-architecture
  model in the release format), its full and padded cases: relative logit L2 and top-1
  agreement against the int8 model, and the golden README's metrics against the JAX logits.
- random layer: one random layer at a quarter of Grok-1's width (emb 1536, 48 q / 8 kv heads of
  32, 8 experts of width 8192, vocab 8192; a full-width layer's int4 search takes ~25 minutes
  on 2 cores), 128 tokens, the same figures against int8.
- embedded model: validation loss (nats per token) of grok1/assets/default in bf16 (as
  shipped), int8, int4 and fp8 on its held-out text: the last 10 % of each play, tokenized as
  scripts/train_default_model.sh does (steps 1-3, with the shipped tokenizer; not shipped in
  the repository), every k-th window of 512 tokens so that --val-windows spread over all plays.
Writes bench/results/quant_quality_<time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from grok1.assets import default_model_dir
from grok1.checkpoint.convert import convert, load_sharded_native
from grok1.checkpoint.native import load_native, save_native
from grok1.config import GrokConfig
from grok1.golden import golden_metrics, load_cases, rel_l2
from grok1.model import Grok1
from grok1.train.losses import cross_entropy

REPO = Path(__file__).resolve().parents[1]
FORMATS = (("int8", 128), ("int4", 128), ("int4", 64), ("fp8", 128))


def label(weights: str, group: int) -> str:
    return f"int4-g{group}" if weights == "int4" else weights


def versus(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 of logits [P, V] against the reference's and the share of positions whose
    argmax is the reference's."""
    return {"rel_l2": rel_l2(out, ref),
            "top1_agreement": float((out.float().argmax(-1) == ref.float().argmax(-1))
                                    .float().mean())}


def golden_cases(model: Grok1, cases: dict[str, np.ndarray], pad: int):
    """(ours [P, V], golden [P, V]) of the full and padded cases, non-pad positions only."""
    pairs = {}
    with torch.no_grad():
        for case in ("full", "padded"):
            tokens = torch.tensor(cases[f"{case}_tokens"])
            logits = model(tokens)
            keep = tokens != pad
            pairs[case] = (logits[keep], torch.tensor(cases[f"{case}_logits"])[keep])
    return pairs


def measure_golden(golden: Path, work: Path) -> dict[str, dict]:
    cases = load_cases(golden)
    int8_dir = convert(golden / "checkpoint", work / "golden-int8", "int8",
                       config=golden / "config.json", progress=False)
    results, ref = {}, None
    for weights, group in FORMATS:
        folder = int8_dir if weights == "int8" else convert(
            int8_dir, work / f"golden-{label(weights, group)}", weights, group_size=group,
            progress=False)
        model = load_sharded_native(folder)
        pairs = golden_cases(model, cases, model.config.pad_token)
        ref = ref or pairs
        ours = torch.cat([o for o, _ in pairs.values()])
        base = torch.cat([o for o, _ in ref.values()])
        jax = golden_metrics({c: list(zip(o, g, strict=True)) for c, (o, g) in pairs.items()})
        results[label(weights, group)] = {**versus(ours, base), "vs_jax_reference": jax}
        print(f"golden {label(weights, group)}: {results[label(weights, group)]}", flush=True)
    return results


def random_layer_config() -> GrokConfig:
    return GrokConfig.preset("grok-1").replace(num_layers=1, emb_size=1536, key_size=32,
                                               vocab_size=8192, sequence_len=256)


def measure_random_layer(work: Path, seed: int = 0) -> dict[str, dict]:
    config = random_layer_config()
    gen = torch.Generator().manual_seed(seed)
    model = Grok1(config, quantized=True)
    with torch.no_grad():  # int8 uniform, scales so every matrix's output has unit scale
        for name, t in model.state_dict().items():
            if t.dtype == torch.int8:
                t.copy_(torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8))
            elif name.endswith("scales"):
                fan_in = model.get_submodule(name.rsplit(".", 1)[0]).weight.shape[-2]
                t.copy_((torch.rand(t.shape, generator=gen) + 0.5) / (73 * fan_in ** 0.5))
            elif name.endswith("scale"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
            elif name.endswith("router"):  # std 2 / sqrt(D): decisive, as bench/parallel's
                t.copy_(torch.randn(t.shape, generator=gen) * 2 / config.emb_size ** 0.5)
            else:  # embedding: rms 1 after the x78.4 multiplier, so the layer's output (rms
                # ~1 after its sandwich norm) is not drowned in the residual stream
                std = 1 / config.embedding_multiplier_scale
                t.copy_(torch.randn(t.shape, generator=gen) * std)
    src = save_native(model, work / "random-native")
    tokens = torch.randint(3, config.vocab_size, (1, 128), generator=gen)
    results, ref = {}, None
    for weights, group in FORMATS:
        t0 = time.time()
        folder = convert(src, work / f"random-{label(weights, group)}", weights,
                         group_size=group, progress=False)
        seconds = time.time() - t0
        with torch.no_grad():
            logits = load_sharded_native(folder)(tokens)[0]
        ref = logits if ref is None else ref
        results[label(weights, group)] = {**versus(logits, ref), "convert_s": round(seconds, 1)}
        print(f"random layer {label(weights, group)}: {results[label(weights, group)]}",
              flush=True)
    return results


def val_windows(tokens_dir: Path, count: int, seq_len: int = 512) -> torch.Tensor:
    """`count` windows of seq_len + 1 tokens, every k-th of the val split's windows in order."""
    val = np.concatenate([np.fromfile(p, dtype=np.uint16)
                          for p in sorted(tokens_dir.glob("val_*.bin"))])
    starts = np.arange(0, len(val) - seq_len, seq_len)
    picked = starts[np.linspace(0, len(starts) - 1, count).round().astype(int)]
    return torch.from_numpy(np.stack([val[s:s + seq_len + 1] for s in picked]).astype(np.int64))


def val_loss(model: Grok1, windows: torch.Tensor, batch: int = 8) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            total += float(cross_entropy(model(w[:, :-1]), w[:, 1:])) * len(w)
    return total / len(windows)


def measure_default_model(tokens_dir: Path, count: int, work: Path) -> dict[str, dict]:
    windows = val_windows(tokens_dir, count)
    results = {}
    folders = {"bf16": None} | {label(w, g): (w, g) for w, g in FORMATS}
    for name, fmt in folders.items():
        if fmt is None:  # as shipped: grok1's single-file folder, bf16 matrices
            model = load_native(default_model_dir())
        else:
            model = load_sharded_native(convert(default_model_dir(), work / f"default-{name}",
                                                fmt[0], group_size=fmt[1], progress=False))
        loss = val_loss(model, windows)
        results[name] = {"val_loss": loss}
        print(f"default model {name}: val loss {loss:.4f}", flush=True)
    base = results["bf16"]["val_loss"]
    for r in results.values():
        r["vs_bf16_pct"] = 100 * (r["val_loss"] - base) / base
    return {"windows": count, "tokens": count * 512, "formats": results}


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--golden", type=Path, default=REPO.parent / "shared" / "grok1" / "golden")
    p.add_argument("--val-tokens", type=Path, default=None,
                   help="token folder of scripts/train_default_model.sh step 3 (val_*.bin)")
    p.add_argument("--val-windows", type=int, default=32)
    p.add_argument("--skip-random-layer", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    result: dict[str, object] = {
        "kind": "quant_quality", "device": "cpu", "threads": torch.get_num_threads(),
        "git_sha": git_sha(), "torch": torch.__version__,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "reference": "int8 (the release's weights, bf16(w * s)), plain model on the CPU"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.golden.exists():
            result["golden"] = measure_golden(args.golden, work)
        if not args.skip_random_layer:
            result["random_layer"] = {"config": dataclasses.asdict(random_layer_config()),
                                      "formats": measure_random_layer(work)}
        if args.val_tokens is not None:
            result["default_model"] = measure_default_model(args.val_tokens, args.val_windows,
                                                            work)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    path = args.out / f"quant_quality_{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_table(result)
    print(f"wrote {path}")


def print_table(result: dict) -> None:
    golden = result.get("golden", {})
    layer = result.get("random_layer", {}).get("formats", {})
    default = result.get("default_model", {}).get("formats", {})
    print("| format | golden rel L2 / top-1 vs int8 | random layer rel L2 / top-1 vs int8 "
          "| default model val loss (vs bf16) |")
    print("|---|---|---|---|")
    for name in ("bf16", *(label(w, g) for w, g in FORMATS)):
        g, r, d = golden.get(name), layer.get(name), default.get(name)
        cells = [f"{g['rel_l2']:.4f} / {g['top1_agreement']:.3f}" if g else "-",
                 f"{r['rel_l2']:.4f} / {r['top1_agreement']:.3f}" if r else "-",
                 f"{d['val_loss']:.4f} ({d['vs_bf16_pct']:+.2f} %)" if d else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
