"""Running grok1 as one process per GPU under torchrun, and the parallel self-check.

    torchrun --nproc-per-node 4 -m grok1 generate --checkpoint CKPT --tp 4 --moe tp "prompt"
    torchrun --nproc-per-node 2 -m grok1.parallel.launch check --golden ../shared/grok1/golden
    torchrun --nproc-per-node 4 -m grok1.parallel.launch check --config grok-1 --set num_layers=4

Multi-node goes through torchrun's rendezvous (same command on every node):
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
        --nproc-per-node 4 -m grok1 generate ... --tp 8
`check` builds the same model on every rank, computes the one-process logits, then shards it
(each variant of --variants in turn) and compares; with --golden it also loads the golden
checkpoint sharded and applies golden/README.md's pass criteria. Rank 0 prints one JSON line
per comparison; the exit status is 1 when any comparison fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from grok1.config import ConfigError, GrokConfig
from grok1.model import Grok1, KVCache
from grok1.golden import golden_metrics, golden_pass
from grok1.parallel.mesh import Mesh, init_distributed, shutdown
# re-exported: bench and serve import them from here
from grok1.parallel.options import add_parallel_args as add_parallel_args
from grok1.parallel.options import wants_parallel as wants_parallel
from grok1.parallel.tensor import Layout, parallelize, shard_model_

# ---- helpers for the grok1 subcommands (their options: grok1/parallel/options.py) -----------------


def load_shard(checkpoint_dir: str | Path, config: GrokConfig | None, layout: Layout,
               device: torch.device, *, progress: bool = True) -> Grok1:
    """`layout.rank`'s slices of the model in `checkpoint_dir`, without collectives yet.

    A release checkpoint is read slice by slice (load.py: no rank holds the whole model); a
    grok1 folder (small trained models) is loaded whole on the CPU, then sliced.
    """
    from grok1.checkpoint import load
    from grok1.checkpoint.native import WEIGHTS_FILE
    from grok1.parallel.load import load_sharded

    path = Path(checkpoint_dir)
    if (path / WEIGHTS_FILE).is_file():
        return shard_model_(load(path, config, device="cpu", progress=False), layout).to(device)
    return load_sharded(path, config or GrokConfig.preset("grok-1"), layout, device=device,
                        progress=progress)


def load_parallel_model(checkpoint_dir: str | Path, config: GrokConfig | str | Path | None,
                        mesh: Mesh, *, moe: str = "tp", unembed: str = "vocab",
                        progress: bool = True) -> Grok1:
    """This rank's shard of the model in `checkpoint_dir`, with its collectives, on its device
    (rank 0 shows the loading progress bar)."""
    if isinstance(config, (str, Path)):
        config = GrokConfig.from_json(config)
    layout = Layout(mesh.tp_size, mesh.tp_rank, moe=moe, unembed=unembed)
    model = load_shard(checkpoint_dir, config, layout, mesh.device,
                       progress=progress and mesh.is_first)
    return parallelize(model, mesh.tp_group, layout).eval().requires_grad_(False)


def load_for_args(args: argparse.Namespace, checkpoint_dir: str | Path) -> tuple[Grok1, Mesh]:
    """For `grok1 generate|serve|bench` under torchrun: join the group (--tp must equal its
    size) and load this rank's shard of `checkpoint_dir` (--config, --moe, --unembed) onto
    cuda:LOCAL_RANK (or the CPU with gloo). Print and write files only where mesh.is_first, and
    give every rank the same sampling seed (`agree_seed`)."""
    mesh = init_distributed(args.tp)
    model = load_parallel_model(checkpoint_dir, args.config, mesh, moe=args.moe,
                                unembed=args.unembed)
    return model, mesh


def cache_config(model: Grok1) -> GrokConfig:
    """What to allocate a rank's KV cache from: the local kv-head count of a sharded model."""
    return model.local_config


def agree_seed(seed: int | None, mesh: Mesh | None) -> int:
    """The same sampling seed on every rank (rank 0's), so every rank picks the same tokens."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if mesh is None or mesh.world_size == 1:
        return seed
    t = torch.tensor([seed], dtype=torch.long, device=mesh.device)
    dist.broadcast(t, src=0)
    return int(t.item())


# ---- random weights ------------------------------------------------------------------------------

def init_random_(model: Grok1, seed: int, *, std: float = 0.02, router_std: float = 0.5) -> Grok1:
    """Fresh random weights in place, on the model's device: int8 matrices with bf16 scales
    giving about `std` per entry (or normal(std) for dense ones), embedding normal(std), norm
    scales around 1, and a router of std `router_std / sqrt(D)` so routing is decisive. Each
    tensor has its own generator seeded from `seed` and its name, so a tensor's values do not
    depend on the others' shapes: replicated tensors come out alike on every rank."""
    g = torch.Generator(model.embed.device)
    D = model.config.emb_size
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if t.dtype == torch.int8:
                t.copy_(torch.randint(-127, 128, t.shape, generator=g, device=t.device,
                                      dtype=torch.int8))
            elif name.endswith("scales"):  # uniform int8 has std 127/sqrt(3)
                u = torch.rand(t.shape, generator=g, device=t.device, dtype=torch.float32)
                t.copy_((std * math.sqrt(3) / 127) * (0.5 + u))
            elif name.endswith("norm.scale") or name == "norm.scale":
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g, device=t.device))
            elif name.endswith("router"):
                t.copy_(torch.randn(t.shape, generator=g, device=t.device) * router_std / math.sqrt(D))
            else:
                t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32) * std)
    return model


def build_random(config: GrokConfig, seed: int, device: torch.device, quantized: bool = True,
                 router_std: float = 0.5) -> Grok1:
    """A random Grok1 made directly on `device` (the same on every rank for the same seed)."""
    with torch.device("meta"):
        model = Grok1(config, quantized=quantized)
    model.to_empty(device=device)
    return init_random_(model, seed, router_std=router_std).eval()


def with_kernels_(model: Grok1) -> Grok1:
    """The one-process model through the same kernels the parallel modules run on a GPU
    (grok1.ops' fused MoE and int8 wo), so a GPU comparison isolates the parallel split."""
    from grok1.ops.linear import Int8Linear
    from grok1.ops.moe import FusedMoE

    for layer in model.layers:
        layer.moe = FusedMoE(layer.moe)
        if layer.attn.wo.quantized:
            layer.attn.wo = Int8Linear(layer.attn.wo)
    return model


# ---- the check -----------------------------------------------------------------------------------

def parse_config(spec: str, sets: list[str]) -> GrokConfig:
    """A preset name or a JSON path, then `field=value` overrides (ints or floats)."""
    config = GrokConfig.from_json(spec) if spec.endswith(".json") else GrokConfig.preset(spec)
    changes = {}
    for item in sets:
        key, _, value = item.partition("=")
        if not value:
            raise ConfigError(f"--set {item!r}: expected field=value")
        changes[key] = float(value) if "." in value else int(value)
    return config.replace(**changes)


def parse_variant(text: str, size: int, rank: int) -> Layout:
    """`tp` / `ep` (the MoE split; attention by heads, unembedding by vocab), or the full form
    `attn:moe:unembed`, e.g. `tp:ep:dim`, `none:ep:none` (expert parallelism alone)."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = ["tp", parts[0], "vocab"]
    if len(parts) != 3:
        raise ConfigError(f"variant {text!r}: expected tp, ep or attn:moe:unembed")
    return Layout(size, rank, attn=parts[0], moe=parts[1], unembed=parts[2])


def run_cases(model: Grok1, tokens_BT: torch.Tensor, decode_steps: int) -> dict[str, torch.Tensor]:
    """Full-sequence logits, and prefill (all but the last `decode_steps` tokens) then decode
    through a KV cache of the rank's local shape: f32 logits per case."""
    T = tokens_BT.shape[1]
    with torch.no_grad():
        full = model(tokens_BT).float()
        cache = KVCache.allocate(cache_config(model), tokens_BT.shape[0], T, tokens_BT.device)
        steps = [model(tokens_BT[:, :T - decode_steps], cache, last_only=True).float()]
        for t in range(T - decode_steps, T - 1):
            steps.append(model(tokens_BT[:, t:t + 1], cache).float())
    return {"full": full, "cached": torch.cat(steps, dim=1)}


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 error, max abs error over max |ref|, argmax agreement per position, and
    `top1_close`: the share of positions whose argmax scores within 1 % of the row's largest
    |ref| of the reference maximum (random models have near-ties that noise may swap)."""
    out2, ref2 = out.flatten(0, -2), ref.flatten(0, -2)
    err = out2 - ref2
    picked = ref2.gather(-1, out2.argmax(-1, keepdim=True))[:, 0]
    slack = 1e-2 * ref2.abs().amax(-1)
    return {"rel_l2": float(err.norm() / ref2.norm()),
            "max_abs_rel": float(err.abs().max() / ref2.abs().max()),
            "argmax_agree": float((out2.argmax(-1) == ref2.argmax(-1)).float().mean()),
            "top1_close": float((picked >= ref2.amax(-1) - slack).float().mean())}


def golden_pairs(model: Grok1, golden: dict) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(our logits, golden logits) per meaningful position of each golden case (README)."""
    device = model.embed.device

    def tok(a) -> torch.Tensor:
        return torch.as_tensor(a).long().to(device)

    pairs = {}
    with torch.no_grad():
        full = model(tok(golden["full_tokens"])).float().cpu()
        ref = torch.as_tensor(golden["full_logits"]).float()
        pairs["full"] = [(full[b, t], ref[b, t]) for b in range(full.shape[0])
                         for t in range(full.shape[1])]
        padded_tokens = tok(golden["padded_tokens"])
        padded = model(padded_tokens).float().cpu()
        real = int((padded_tokens[0] != model.config.pad_token).sum())
        ref = torch.as_tensor(golden["padded_logits"]).float()
        pairs["padded"] = [(padded[0, t], ref[0, t]) for t in range(real)]
        cache = KVCache.allocate(cache_config(model), 1, model.config.sequence_len, device)
        prefill = model(tok(golden["prefill_tokens"]), cache,
                        lengths_B=tok(golden["prefill_length"]), last_only=True).float().cpu()
        pairs["prefill"] = [(prefill[0, 0],
                             torch.as_tensor(golden["prefill_last_logits"]).float()[0, 0])]
        ref = torch.as_tensor(golden["decode_logits"]).float()
        pairs["decode"] = []
        for i, token in enumerate(golden["decode_tokens"].tolist()):
            logits = model(torch.tensor([[token]], device=device), cache).float().cpu()
            pairs["decode"].append((logits[0, 0], ref[i]))
    return pairs


def greedy_tokens(model: Grok1, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`n` greedy tokens per prompt through grok1.generation (static KV cache of the rank)."""
    from grok1.generation import generate
    from grok1.sampling import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [g.token_ids for g in generate(model, prompts, params)]


def _prompts(checkpoint: Path, config: GrokConfig, args) -> list[list[int]]:
    """The --prompt texts through the checkpoint's tokenizer when it has one, else random ids."""
    tokenizer = checkpoint / "tokenizer.model"
    if args.prompt and tokenizer.is_file():
        from grok1.tokenizer import Tokenizer

        return [Tokenizer(tokenizer).encode(text) for text in args.prompt]
    g = torch.Generator().manual_seed(args.seed + 2)
    return [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (7, 3)]


def check_checkpoint(mesh: Mesh, variants: list[str], args) -> list[dict]:
    """A checkpoint (--checkpoint, or the golden's) through one process and through each
    parallel variant: sharded load == sliced full load, greedy tokens, and either the golden
    cases under golden/README.md's criteria (--golden) or logits on random tokens."""
    import numpy as np

    from grok1.checkpoint import load

    golden = dict(np.load(args.golden / "golden.npz")) if args.golden else None
    config = GrokConfig.from_json(args.golden / "config.json") if args.golden else None
    checkpoint = args.checkpoint or args.golden / "checkpoint"
    one = load(checkpoint, config, device=mesh.device, progress=False)
    config = one.config
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(1, config.vocab_size, (args.batch, args.tokens), generator=g)
    tokens = tokens.to(mesh.device)
    prompts = _prompts(checkpoint, config, args)
    one_cases = run_cases(one, tokens, args.decode_steps) if golden is None else {}
    one_greedy = greedy_tokens(one, prompts, args.generate)
    results = []
    if golden is not None:
        one_pairs = golden_pairs(one, golden)
        results.append({"what": "golden", "variant": "1-process", **golden_metrics(one_pairs)})
        results[0]["ok"] = golden_pass(results[0])
    for text in variants:
        layout = parse_variant(text, mesh.tp_size, mesh.tp_rank)
        model = load_shard(checkpoint, config, layout, mesh.device, progress=False)
        if args.check_slices:  # a sharded load equals slicing the full load
            sliced = shard_model_(copy.deepcopy(one), layout).state_dict()
            loaded = model.state_dict()
            same = sliced.keys() == loaded.keys() and all(
                torch.equal(sliced[k], loaded[k]) for k in sliced)
            results.append({"what": "sharded_load_equals_sliced", "variant": text, "ok": same})
        parallelize(model, mesh.tp_group, layout).eval()
        if golden is None:  # (the golden cases below play this part for the golden model)
            for case, out in run_cases(model, tokens, args.decode_steps).items():
                c = compare(out, one_cases[case])
                ok = c["rel_l2"] <= args.ckpt_rtol and c["top1_close"] >= args.min_top1
                results.append({"what": f"checkpoint_{case}", "variant": text, **c, "ok": ok})
        same = greedy_tokens(model, prompts, args.generate) == one_greedy
        results.append({"what": "greedy_tokens_equal", "variant": text, "tokens": args.generate,
                        "ok": same})
        if golden is not None:
            pairs = golden_pairs(model, golden)
            m = golden_metrics(pairs)
            worst = max(compare(torch.stack([o for o, _ in pairs[k]]),
                                torch.stack([o for o, _ in one_pairs[k]]))["rel_l2"]
                        for k in pairs)
            results.append({"what": "golden", "variant": text, **m, "vs_1proc_rel_l2": worst,
                            "ok": golden_pass(m) and worst <= args.ckpt_rtol})
    return results


def check_random(mesh: Mesh, config: GrokConfig, variants: list[str], args) -> list[dict]:
    """Parallel logits vs one process's on the same random model; on a GPU the pass criterion
    is against the one-process model run through the same kernels (`with_kernels_`), and the
    distance to the plain model.py path is reported beside it."""
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(1, config.vocab_size, (args.batch, args.tokens), generator=g)
    tokens = tokens.to(mesh.device)
    # a decisive router (logits of std ~2): a tie broken differently would swap whole experts
    full = build_random(config, args.seed, mesh.device, quantized=not args.dense, router_std=2.0)
    plain = run_cases(full, tokens, args.decode_steps)
    ref = plain
    if mesh.device.type == "cuda":
        ref = run_cases(with_kernels_(copy.deepcopy(full)), tokens, args.decode_steps)
    results = []
    for i, text in enumerate(variants):
        layout = parse_variant(text, mesh.tp_size, mesh.tp_rank)
        model = full if i == len(variants) - 1 else copy.deepcopy(full)  # the last one in place
        parallelize(model, mesh.tp_group, layout)
        out = run_cases(model, tokens, args.decode_steps)
        for case in out:
            c = compare(out[case], ref[case])
            ok = c["rel_l2"] <= args.rtol and c["top1_close"] >= args.min_top1
            if ref is not plain:
                c["vs_plain_rel_l2"] = compare(out[case], plain[case])["rel_l2"]
            results.append({"what": f"random_{case}", "variant": text, **c, "ok": ok})
        del model
    return results


def run_check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grok1.parallel.launch check")
    p.add_argument("--golden", type=Path, help="golden folder: checkpoint/, config.json, golden.npz")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="check this checkpoint (release or grok1 folder; default: the golden's)")
    p.add_argument("--ckpt-rtol", type=float, default=0.05,
                   help="rel L2 bound vs one process for a checkpoint (golden README: accumulation "
                        "order alone moves its 11-layer random model 0.3 to 5 %%)")
    p.add_argument("--generate", type=int, default=8, help="greedy tokens compared per prompt")
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text (with the checkpoint's tokenizer.model; else random ids)")
    p.add_argument("--config", default="tiny", help="preset or JSON for the random-model check")
    p.add_argument("--set", action="append", default=[], help="config override field=value")
    p.add_argument("--variants", default="tp,ep", help="comma list: tp, ep or attn:moe:unembed")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="bf16 matrices instead of int8 + scales")
    p.add_argument("--rtol", type=float, default=2e-2, help="relative L2 bound vs one process")
    p.add_argument("--min-top1", type=float, default=0.95,
                   help="share of positions whose argmax is a near-top reference logit")
    p.add_argument("--check-slices", action="store_true",
                   help="also check that the sharded load equals slicing the full load")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mesh = init_distributed(backend=args.backend)
    variants = [v for v in args.variants.split(",") if v]
    try:
        if args.golden or args.checkpoint:
            results = check_checkpoint(mesh, variants, args)
        else:
            results = check_random(mesh, parse_config(args.config, args.set), variants, args)
        ok = all(r["ok"] for r in results)
        oks = torch.tensor([int(ok)], device=mesh.device)
        dist.all_reduce(oks, op=dist.ReduceOp.MIN)  # every rank must agree
        if mesh.is_first:
            for r in results:
                print(json.dumps({"num_ranks": mesh.world_size, "device": mesh.device.type,
                                  **{k: round(v, 6) if isinstance(v, float) else v
                                     for k, v in r.items()}}), flush=True)
        return 0 if int(oks) == 1 else 1
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "check":
        raise SystemExit("usage: torchrun --nproc-per-node N -m grok1.parallel.launch check ...")
    sys.exit(run_check(argv[1:]))


if __name__ == "__main__":
    main()
