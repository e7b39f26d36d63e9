"""The parallel self-check: the same model through one process and through torchrun's ranks
(tensor / expert parallel), each rank built by grok1's front door (grok1.load, random_weights).

    torchrun --nproc-per-node 2 bench/parallel_check.py --golden ../shared/grok1/golden
    torchrun --nproc-per-node 2 bench/parallel_check.py --checkpoint grok1/assets/default \
        --prompt "ROMEO:" --generate 24
    torchrun --nproc-per-node 4 bench/parallel_check.py --config grok-1 --set num_layers=4

Multi-node goes through torchrun's rendezvous (same command on every node):
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
        --nproc-per-node 4 bench/parallel_check.py ...
A checkpoint (--checkpoint, or --golden's) is loaded whole on every rank, then sharded by each
variant of --variants in turn: a sharded load must equal slicing the whole one (--check-slices),
greedy tokens must be the same, and the golden cases must pass golden/README.md's criteria
(grok1.golden) and stay near one process's; without --golden, logits on random tokens are
compared. Without a checkpoint, a random model of --config is compared likewise. Rank 0 prints
one JSON line per comparison; the exit status is 1 when any comparison fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without an install

import torch
import torch.distributed as dist

import grok1
from bench._common import compare_logits
from grok1.config import ConfigError, GrokConfig
from grok1.golden import golden_metrics, golden_pairs, golden_pass, load_cases
from grok1.model import Grok1, KVCache
from grok1.parallel.mesh import Mesh, init_distributed, shutdown
from grok1.parallel.tensor import Layout, shard_model_


def parse_variant(text: str, size: int, rank: int) -> Layout:
    """`tp` / `ep` (the MoE split; attention by heads, unembedding by vocab), or the full form
    `attn:moe:unembed`, e.g. `tp:ep:dim`, `none:ep:none` (expert parallelism alone)."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = ["tp", parts[0], "vocab"]
    if len(parts) != 3:
        raise ConfigError(f"variant {text!r}: expected tp, ep or attn:moe:unembed")
    return Layout(size, rank, attn=parts[0], moe=parts[1], unembed=parts[2])


def with_kernels_(model: Grok1) -> Grok1:
    """The one-process model through the same kernels the parallel modules run on a GPU
    (grok1.ops' fused MoE and int8 wo), so a GPU comparison isolates the parallel split."""
    from grok1.ops.linear import QuantLinear
    from grok1.ops.moe import FusedMoE

    for layer in model.layers:
        layer.moe = FusedMoE(layer.moe)
        if layer.attn.wo.quantized:
            layer.attn.wo = QuantLinear(layer.attn.wo)
    return model


def run_cases(model: Grok1, tokens_BT: torch.Tensor, decode_steps: int) -> dict[str, torch.Tensor]:
    """Full-sequence logits, and prefill (all but the last `decode_steps` tokens) then decode
    through a KV cache of the rank's local shape: f32 logits per case."""
    T = tokens_BT.shape[1]
    with torch.no_grad():
        full = model(tokens_BT).float()
        cache = KVCache.allocate(model.local_config, tokens_BT.shape[0], T, tokens_BT.device)
        steps = [model(tokens_BT[:, :T - decode_steps], cache, last_only=True).float()]
        for t in range(T - decode_steps, T - 1):
            steps.append(model(tokens_BT[:, t:t + 1], cache).float())
    return {"full": full, "cached": torch.cat(steps, dim=1)}


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


def _random_tokens(config: GrokConfig, args, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(1, config.vocab_size, (args.batch, args.tokens), generator=g).to(device)


def check_checkpoint(mesh: Mesh, variants: list[str], args) -> list[dict]:
    """A checkpoint (--checkpoint, or the golden's) through one process and through each
    parallel variant: sharded load == sliced full load, greedy tokens, and either the golden
    cases under golden/README.md's criteria (--golden) or logits on random tokens."""
    golden = load_cases(args.golden) if args.golden else None
    config = args.golden / "config.json" if args.golden else None
    checkpoint = args.checkpoint or args.golden / "checkpoint"
    one = grok1.load(checkpoint, config=config, device=mesh.device, progress=False)
    tokens = _random_tokens(one.config, args, mesh.device)
    prompts = _prompts(checkpoint, one.config, args)
    one_cases = run_cases(one, tokens, args.decode_steps) if golden is None else {}
    one_greedy = greedy_tokens(one, prompts, args.generate)
    results = []
    if golden is not None:
        one_pairs = golden_pairs(one, golden)
        m = golden_metrics(one_pairs)
        results.append({"what": "golden", "variant": "1-process", **m, "ok": golden_pass(m)})
    for text in variants:
        layout = parse_variant(text, mesh.tp_size, mesh.tp_rank)
        model = grok1.load(checkpoint, config=config, mesh=mesh, layout=layout, progress=False)
        if args.check_slices:  # a sharded load equals slicing the full load
            sliced = shard_model_(copy.deepcopy(one), layout).state_dict()
            loaded = model.state_dict()
            same = sliced.keys() == loaded.keys() and all(
                torch.equal(sliced[k], loaded[k]) for k in sliced)
            results.append({"what": "sharded_load_equals_sliced", "variant": text, "ok": same})
        if golden is None:  # (the golden cases below play this part for the golden model)
            for case, out in run_cases(model, tokens, args.decode_steps).items():
                c = compare_logits(out, one_cases[case])
                ok = c["rel_l2"] <= args.ckpt_rtol and c["top1_close"] >= args.min_top1
                results.append({"what": f"checkpoint_{case}", "variant": text, **c, "ok": ok})
        same = greedy_tokens(model, prompts, args.generate) == one_greedy
        results.append({"what": "greedy_tokens_equal", "variant": text, "tokens": args.generate,
                        "ok": same})
        if golden is not None:
            pairs = golden_pairs(model, golden, kv_config=model.local_config)
            m = golden_metrics(pairs)
            worst = max(compare_logits(torch.stack([o for o, _ in pairs[k]]),
                                       torch.stack([o for o, _ in one_pairs[k]]))["rel_l2"]
                        for k in pairs)
            results.append({"what": "golden", "variant": text, **m, "vs_1proc_rel_l2": worst,
                            "ok": golden_pass(m) and worst <= args.ckpt_rtol})
    return results


def check_random(mesh: Mesh, config: GrokConfig, variants: list[str], args) -> list[dict]:
    """Parallel logits vs one process's on the same random model (grok1.random_weights: a
    rank's model is the slice of the one-process one); on a GPU the pass criterion is against
    the one-process model run through the same kernels (`with_kernels_`), and the distance to
    the plain model.py path is reported beside it."""
    tokens = _random_tokens(config, args, mesh.device)
    # a decisive router (logits of std ~2): a tie broken differently would swap whole experts
    build = dict(quantized=not args.dense, seed=args.seed, router_std=2.0)
    full = grok1.random_weights(config, device=mesh.device, **build)
    plain = run_cases(full, tokens, args.decode_steps)
    ref = plain
    if mesh.device.type == "cuda":
        ref = run_cases(with_kernels_(full), tokens, args.decode_steps)
    del full
    results = []
    for text in variants:
        layout = parse_variant(text, mesh.tp_size, mesh.tp_rank)
        model = grok1.random_weights(config, mesh=mesh, layout=layout, **build)
        out = run_cases(model, tokens, args.decode_steps)
        for case in out:
            c = compare_logits(out[case], ref[case])
            ok = c["rel_l2"] <= args.rtol and c["top1_close"] >= args.min_top1
            if ref is not plain:
                c["vs_plain_rel_l2"] = compare_logits(out[case], plain[case])["rel_l2"]
            results.append({"what": f"random_{case}", "variant": text, **c, "ok": ok})
        del model
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--golden", type=Path,
                   help="golden folder: checkpoint/, config.json, golden.npz")
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
            results = check_random(mesh, GrokConfig.resolve(args.config, args.set), variants,
                                   args)
        ok = all(r["ok"] for r in results)
        oks = torch.tensor([int(ok)], device=mesh.device)
        dist.all_reduce(oks, op=dist.ReduceOp.MIN)  # every rank must agree
        if mesh.is_main:
            for r in results:
                print(json.dumps({"num_ranks": mesh.world_size, "device": mesh.device.type,
                                  **{k: round(v, 6) if isinstance(v, float) else v
                                     for k, v in r.items()}}), flush=True)
        return 0 if int(oks) == 1 else 1
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
