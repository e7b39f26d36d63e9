"""Decode and prefill of tensor-/expert-parallel Grok-1 across GPUs, on the engine's runner (paged
KV cache, fused int8 kernels, one CUDA graph per decode batch bucket with the NCCL all-reduces
captured inside), each figure beside its roofline: the step's bytes (or FLOPs) spread over all
GPUs, / (num_gpus x copy bandwidth) measured in the same run (ANCHORS.md; bench/engine_bench.py).

    torchrun --nproc-per-node 4 bench/parallel_decode.py --layers 4 --moe tp ep --verify --out DIR
    torchrun --nproc-per-node 4 bench/parallel_decode.py --layers 64 --moe tp --out DIR  # 4 x H200

Weights are random int8 (or --weights int4 / fp8; grok1.random_weights) built directly on each GPU, already sharded (no
rank ever holds the whole model). `--verify` (reduced depth only) first builds the whole model on every GPU, runs prompts
through the one-GPU runner, then shards that same model and checks the parallel runner's logits
(prefill, then decode steps replayed from CUDA graphs) against it. Rank 0 prints one line per
figure and appends JSON objects (the engine bench's fields plus num_gpus, tp, moe,
decode_tok_per_s, memory per GPU) to DIR/parallel_decode.jsonl. Runs on CPU with gloo for
--verify only (no timings there).

`--breakdown` adds to each decode and prefill row the GPU time per layer by part of the layer
(bench/kernel_breakdown.py: torch.profiler over 10 replayed decode steps or 3 prefills, kernels
grouped by name) and what the full-depth model would take (per layer x 64 + once-a-step work):

    torchrun --nproc-per-node 2 bench/parallel_decode.py --layers 4 --breakdown --out DIR
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grok1
from bench._common import compare_logits
from grok1.config import GrokConfig
from grok1.model import Grok1
from grok1.parallel.mesh import Mesh, init_distributed, shutdown
from grok1.parallel.tensor import Layout, local_config, parallelize, shard_model_
from grok1.quant import INT4_GROUP_SIZE, INT8, weight_format

GIB = 2**30
REF_DECODE_MS = 40.1  # ANCHORS.md: the JAX reference, 4 full-width layers, batch 1, one H100


def log(mesh: Mesh, text: str) -> None:
    if mesh.is_main:
        print(text, flush=True)


def _gpus(mesh: Mesh) -> str:
    return f"{mesh.world_size} x {torch.cuda.get_device_name(mesh.device)}"


# ---- the model -------------------------------------------------------------------------------

def sharded_bytes(config: GrokConfig, layout: Layout, weights=INT8) -> int:
    """Bytes of one rank's weights (from a meta build; nothing allocated)."""
    with torch.device("meta"):
        model = shard_model_(Grok1(config, weights=weights), layout)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def kv_bytes(config: GrokConfig, layout: Layout, batch: int, tokens: int) -> int:
    """One rank's paged KV cache for `batch` sequences of `tokens` (bf16 K and V)."""
    kv_heads = local_config(config, layout).num_kv_heads
    return config.num_layers * batch * (tokens + 32) * 2 * kv_heads * config.key_size * 2


# ---- engine-path verification -----------------------------------------------------------------

def _runner(model: Grok1, batch: int, max_len: int):
    from grok1.engine.runner import ModelRunner

    block = 16
    return ModelRunner(model, num_blocks=batch * -(-max_len // block) + 1, block_size=block,
                       max_model_len=max_len, max_batch_size=batch, use_cuda_graphs=True)


def run_prompts(model: Grok1, prompts: list[list[int]], decode: list[list[int]]) -> torch.Tensor:
    """Logits [steps, B, V]: prefill of every prompt, then each row of `decode` fed one token a
    step (the decode steps replay CUDA graphs on a GPU)."""
    from grok1.engine.kv_cache import BlockPool
    from grok1.engine.scheduler import ScheduledChunk, Sequence

    B = len(prompts)
    max_len = max(len(p) for p in prompts) + len(decode) + 1
    runner = _runner(model, B, max_len)
    pool = BlockPool(B * -(-max_len // runner.block_size), runner.block_size)
    seqs = []
    for b, prompt in enumerate(prompts):
        seq = Sequence(f"r{b}", list(prompt), len(prompt))
        seq.block_ids = pool.allocate(pool.blocks_for(max_len))
        seqs.append(seq)
    steps = [runner.execute([ScheduledChunk(s, 0, len(s.token_ids)) for s in seqs])]
    for tokens in decode:
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
        steps.append(runner.execute([ScheduledChunk(s, len(s.token_ids) - 1, 1) for s in seqs]))
    out = torch.stack(steps).float().cpu()
    del runner  # frees its CUDA graphs (captured NCCL calls) before the group goes away
    gc.collect()
    return out


def verify(config: GrokConfig, layout: Layout, mesh: Mesh, args) -> tuple[Grok1, list[dict]]:
    """One-GPU runner vs the parallel runner on the same random model; returns the shard."""
    # decisive routing: the larger the router's scale, the rarer a top-2 choice that bf16
    # noise can flip between the two runs (one flip changes that token's output entirely)
    full = grok1.random_weights(config, seed=args.seed, device=mesh.device,
                                router_std=args.router_std, weights=args.format)
    g = torch.Generator().manual_seed(args.seed + 7)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist()
               for n in (args.verify_tokens, args.verify_tokens // 2 + 1, 5)]
    decode = torch.randint(3, config.vocab_size, (args.verify_steps, len(prompts)),
                           generator=g).tolist()
    ref = run_prompts(copy.deepcopy(full), prompts, decode)  # the copy gets the 1-GPU kernels
    # the yardstick: the plain model (no engine, no kernels: the twins, through cuBLAS) on the
    # same prompts' last tokens. The kernels compute the reference's numerics as the twins do
    # (the numerics issue), so the one-GPU engine must be within rtol of the plain model, and
    # the parallel run within rtol of the one-GPU engine.
    with torch.no_grad():
        plain = torch.stack([full(torch.tensor([p], device=mesh.device), last_only=True)[0, -1]
                             for p in prompts]).float().cpu()
    model = parallelize(full, mesh.tp_group, layout)
    out = run_prompts(model, prompts, decode)
    results = []
    one_vs_plain = compare_logits(ref[0], plain)["rel_l2"]
    par_vs_plain = compare_logits(out[0], plain)["rel_l2"]
    for name, sl in (("prefill", slice(0, 1)), ("decode", slice(1, None))):
        c = compare_logits(out[sl], ref[sl])
        results.append({"kind": "verify", "case": name, **c,
                        "ok": c["rel_l2"] <= args.rtol and one_vs_plain <= args.rtol
                        and c["top1_close"] >= 0.95,
                        "one_gpu_vs_plain_prefill_rel_l2": one_vs_plain,
                        "parallel_vs_plain_prefill_rel_l2": par_vs_plain})
    return model, results


# ---- timings ---------------------------------------------------------------------------------

def allreduce_us(mesh: Mesh, numel: int, graph: bool) -> float:
    """Latency of one f32 all-reduce of `numel` values (a decode step's partial sums)."""
    from bench._common import time_ms

    t = torch.randn(numel, device=mesh.device)
    if not graph:
        return 1e3 * time_ms(lambda: dist.all_reduce(t, group=mesh.tp_group), reps=100)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            dist.all_reduce(t, group=mesh.tp_group)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            dist.all_reduce(t, group=mesh.tp_group)
    us = 1e3 * time_ms(g.replay, reps=50) / 10
    del g
    return us


def profile_breakdown(model: Grok1, mesh: Mesh, args, full_layers: int) -> dict[tuple, dict]:
    """{("decode", batch) or ("prefill", tokens): kernel_breakdown.breakdown(...)} from
    torch.profiler over 10 decode steps (CUDA-graph replays, as bench_decode times them) and
    3 eager prefills. Every rank runs them (the steps hold collectives); rank 0's kernels."""
    from torch.profiler import ProfilerActivity, profile

    from bench.engine_bench import _sequences
    from bench.kernel_breakdown import breakdown, kernel_times
    from grok1.engine.scheduler import ScheduledChunk, Sequence

    L, V = model.config.num_layers, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    cases = []
    if args.batch:
        runner = _runner(model, max(args.batch), args.context + 64)
        cases += [(("decode", B), runner, _sequences(B, args.context, runner.block_size, V, gen),
                   10) for B in args.batch]
    for T in args.prefill or []:
        prefill_runner = _runner(model, 1, T + 16)
        seq = Sequence("p", torch.randint(3, V, (T,), generator=gen).tolist(), T)
        seq.block_ids = list(range(1, -(-T // prefill_runner.block_size) + 1))
        cases.append((("prefill", T), prefill_runner, [ScheduledChunk(seq, 0, T)], 3))
    out = {}
    for key, runner, chunks, steps in cases:
        for _ in range(3):  # captures the bucket's graph, compiles, settles
            runner.execute(chunks)
        torch.cuda.synchronize()
        # every rank enters the profiled steps together: a rank that starts early spends its
        # first all-reduces waiting for the others, which the profiler books as all-reduce time
        # (592 us a layer at batch 1 in the first 64-layer run, a step of 262 us a layer)
        dist.barrier(group=mesh.tp_group)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.execute(chunks)
            torch.cuda.synchronize()
        out[key] = breakdown(kernel_times(prof), steps, L, full_layers)
    cases.clear()  # the runners (and the graphs' captured collectives) go now
    runner = prefill_runner = None
    gc.collect()
    return out


def attach_breakdowns(results: list[dict], parts: dict[tuple, dict]) -> None:
    """Each decode row gets parts[("decode", batch)], each prefill row parts[("prefill",
    tokens)] as its "breakdown"; other rows (the all-reduce timings) have none."""
    for r in results:
        if r["kind"] == "decode":
            key = ("decode", r["batch"])
        elif r["kind"] == "prefill":
            key = ("prefill", r["prefill_tokens"])
        else:
            continue
        if key in parts:
            r["breakdown"] = parts[key]


def bench(model: Grok1, mesh: Mesh, moe: str, args) -> list[dict]:
    from bench._common import environment, measure_ceilings
    from bench.engine_bench import bench_decode, bench_prefill

    N = mesh.world_size
    ceilings = measure_ceilings(str(mesh.device))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(mesh.device)  # not the probe's buffers or --verify's model
    log(mesh, f"ceilings (rank 0): copy {ceilings['copy_gbps']:.0f} GB/s, bf16 "
              f"{ceilings['bf16_tflops']:.0f} TFLOP/s; x {N} GPUs")
    results = []
    if args.batch:
        results += bench_decode(model, args.batch, args.context, ceilings)
    gc.collect()  # the decode runner's graphs go before the next runner allocates
    if args.prefill:
        results += bench_prefill(model, args.prefill, ceilings)
    gc.collect()
    if N > 1:
        D = model.config.emb_size
        for tokens in (1, 64):
            for graph in (False, True):
                results.append({"kind": "allreduce_f32", "tokens": tokens, "graph": graph,
                                "us": allreduce_us(mesh, tokens * D, graph)})
    if args.breakdown:
        attach_breakdowns(results, profile_breakdown(model, mesh, args, args.full_layers))
    peak = torch.tensor([torch.cuda.max_memory_allocated(mesh.device) / GIB], device=mesh.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    env = environment()
    env.update(num_gpus=N, tp=N, moe=moe, layers=model.config.num_layers, ceilings=ceilings,
               dtype=f"{args.format.label()} weights, bf16 act", weights=args.format.name,
               peak_memory_gib_per_gpu=float(peak))
    for r in results:
        r.update(env)
        if "roofline_ms" in r:  # the one-GPU roofline spread over N GPUs
            r["roofline_ms"] /= N
            step = r.get("decode_step_ms", r.get("prefill_ms"))
            r["pct_of_roofline"] = 100 * r["roofline_ms"] / step
        if r["kind"] == "decode":
            r["decode_tok_per_s"] = 1e3 * r["batch"] / r["decode_step_ms"]
            r["roofline_tok_per_s"] = 1e3 * r["batch"] / r["roofline_ms"]
    return results


def profile_decode(model: Grok1, mesh: Mesh, moe: str, context: int, out: Path | None) -> None:
    """Where one batch-1 decode step spends GPU time on rank 0: torch.profiler's kernel table
    over 10 CUDA-graph replays (every rank replays: the step holds collectives)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.engine_bench import _sequences

    runner = _runner(model, 1, context + 64)
    chunks = _sequences(1, context, runner.block_size, model.config.vocab_size,
                        torch.Generator().manual_seed(0))
    for _ in range(3):
        runner.execute(chunks)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runner.execute(chunks)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20,
                                      max_name_column_width=70)
    if mesh.is_main:
        print(f"== profile: decode b=1, 10 steps, {mesh.world_size} GPU(s), moe {moe}\n{table}",
              flush=True)
        if out is not None:
            (out / f"profile_decode_{mesh.world_size}gpu_{moe}.txt").write_text(table)
    del runner
    gc.collect()


def describe(r: dict) -> str:
    head = f"[{r.get('num_gpus', '?')} GPU, moe {r.get('moe')}, L={r.get('layers')}]"
    if "breakdown" in r:
        from bench.kernel_breakdown import describe as describe_breakdown

        what = (f"decode b={r['batch']}" if r["kind"] == "decode"
                else f"prefill T={r['prefill_tokens']}")
        rest = {k: v for k, v in r.items() if k != "breakdown"}
        return describe(rest) + "\n" + describe_breakdown(r["breakdown"], f"{head} {what}")
    if r["kind"] == "decode":
        return (f"{head} decode b={r['batch']} ctx={r['context']}: {r['decode_step_ms']:.3f} ms "
                f"= {r['decode_tok_per_s']:.1f} tok/s | roofline {r['roofline_ms']:.3f} ms = "
                f"{r['roofline_tok_per_s']:.0f} tok/s ({r['pct_of_roofline']:.0f}%)"
                + (f" | reference 1 GPU {REF_DECODE_MS} ms" if r["layers"] == 4 and
                   r["batch"] == 1 else ""))
    if r["kind"] == "prefill":
        return (f"{head} prefill T={r['prefill_tokens']}: {r['prefill_ms']:.1f} ms | roofline "
                f"{r['roofline_ms']:.1f} ms ({r['pct_of_roofline']:.0f}%)")
    if r["kind"] == "allreduce_f32":
        return f"{head} all-reduce f32 x{r['tokens']} tokens, graph={r['graph']}: {r['us']:.1f} us"
    if r["kind"] == "verify":
        return (f"{head} verify {r['case']} vs one GPU: rel L2 {r['rel_l2']:.2e}, max "
                f"{r['max_abs_rel']:.2e}, argmax agree {r['argmax_agree']:.2f}, top-1 close "
                f"{r['top1_close']:.2f}; prefill vs the plain model: one GPU "
                f"{r['one_gpu_vs_plain_prefill_rel_l2']:.2e}, parallel "
                f"{r['parallel_vs_plain_prefill_rel_l2']:.2e}: {'ok' if r['ok'] else 'FAIL'}")
    return f"{head} {json.dumps(r)}"


def report(mesh: Mesh, results: list[dict], moe: str, config: GrokConfig,
           out: Path | None) -> bool:
    """Print one line per result (rank 0), append them to out/parallel_decode.jsonl; all ok?"""
    for r in results:
        r.setdefault("num_gpus", mesh.world_size)
        r.setdefault("moe", moe)
        r.setdefault("layers", config.num_layers)
        log(mesh, describe(r))
    if out and mesh.is_main and results:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "parallel_decode.jsonl", "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return all(r.get("ok", True) for r in results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="grok-1", help="preset or JSON (full width by default)")
    p.add_argument("--set", action="append", default=[], help="config override field=value")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--moe", nargs="+", default=["tp"], choices=["tp", "ep"])
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64, 128])
    p.add_argument("--context", type=int, default=512, help="cached tokens per sequence (decode)")
    p.add_argument("--prefill", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--verify", action="store_true", help="check against the one-GPU runner first")
    p.add_argument("--verify-tokens", type=int, default=24)
    p.add_argument("--verify-steps", type=int, default=4)
    p.add_argument("--rtol", type=float, default=2e-2, help="rel L2 bound of --verify")
    p.add_argument("--router-std", type=float, default=2.0, help="--verify's router scale")
    p.add_argument("--weights", choices=["int8", "int4", "fp8"], default="int8",
                   help="random weights in this format (int8: the release's)")
    p.add_argument("--group-size", type=int, default=INT4_GROUP_SIZE,
                   help="int4's inputs per scale group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="append JSON lines to DIR/...jsonl")
    p.add_argument("--profile", action="store_true", help="kernel table of a b=1 decode step")
    p.add_argument("--breakdown", action="store_true",
                   help="GPU us per layer by part (attention, MoE, all-reduce, ...) in each "
                        "decode and prefill row, and the full-depth estimate")
    args = p.parse_args()
    args.format = weight_format(args.weights, args.group_size)
    mesh = init_distributed()
    base = GrokConfig.resolve(args.config, args.set)
    args.full_layers = base.num_layers  # what --breakdown's estimate scales to
    config = base.replace(num_layers=args.layers)
    ok = True
    try:
        for moe in args.moe:
            layout = Layout(mesh.tp_size, mesh.tp_rank, moe=moe)
            need = sharded_bytes(config, layout, args.format)
            if mesh.device.type == "cuda":
                free_t = torch.tensor([torch.cuda.mem_get_info(mesh.device)[0]], device=mesh.device)
                dist.all_reduce(free_t, op=dist.ReduceOp.MIN)  # every rank must decide alike
                free = int(free_t)
                full = sharded_bytes(config, Layout(1, 0), args.format) if args.verify and layout.size > 1 else 0
                work = kv_bytes(config, layout, max(args.batch or [1]), args.context) + 3 * GIB
                if need + full + work > free:  # + KV cache, graphs and activations
                    log(mesh, f"skip: {config.num_layers} layers need {need / GIB:.1f} GiB per "
                              f"GPU (+{full / GIB:.1f} to verify, +{work / GIB:.1f} working) "
                              f"of {free / GIB:.1f} free on {_gpus(mesh)}")
                    continue
            start = time.perf_counter()
            results = []
            if args.verify and mesh.world_size > 1:
                model, results = verify(config, layout, mesh, args)
            elif mesh.world_size > 1:
                model = grok1.random_weights(config, seed=args.seed, mesh=mesh, layout=layout,
                                             weights=args.format)
            else:  # one GPU: the engine's own path (no parallel modules), the scaling's baseline
                model = grok1.random_weights(config, seed=args.seed, device=mesh.device,
                                             weights=args.format)
            log(mesh, f"built {config.num_layers}-layer model, moe {moe}: {need / GIB:.1f} GiB "
                      f"of weights per rank, {time.perf_counter() - start:.0f} s")
            ok &= report(mesh, results, moe, config, args.out)  # --verify's, before timing
            if mesh.device.type == "cuda" and (args.batch or args.prefill):
                ok &= report(mesh, bench(model, mesh, moe, args), moe, config, args.out)
            if mesh.device.type == "cuda" and args.profile:
                profile_decode(model, mesh, moe, args.context, args.out)
            del model
            gc.collect()
            if mesh.device.type == "cuda":
                torch.cuda.empty_cache()  # the next MoE mode builds its own full-size shard
        flag = torch.tensor([int(ok)], device=mesh.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return 0 if int(flag) else 1
    finally:
        gc.collect()
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
