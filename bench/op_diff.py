"""Each engine op beside its plain twin, layer by layer: where does the engine depart?

Runs the engine's runner (grok1.engine.runner) on one prompt, a prefill of --tokens tokens then
--decode steps through the paged cache, with every op the runner calls wrapped: each call's
output is compared with its twin evaluated on the very same inputs (so the figure is that op's
own departure, not what earlier ops passed on), and the runner's logits with the plain model's
(the accumulated departure). Ops: the first norm, q/k/v projections (summed partial sums), RoPE
with the cache write (q out, k and v as written), paged attention, the wo projection, the fused
residual norms (h and the next norm's x), the router (expert choices), the MoE.

    python bench/op_diff.py --golden ../shared/grok1/golden          # the golden checkpoint
    python bench/op_diff.py --layers 2                                # random full-width int8
    TRITON_INTERPRET=1 python bench/op_diff.py --golden ... --device cpu   # kernels on the CPU

Prints one row per (op, layer): relative L2 to the twin and the share of elements more than one
bf16 ulp away; writes all rows as JSON (--out). A faithful kernel sits at 0 or a few 1e-3 with a
share near 0; an indexing or masking error shows as O(1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import grok1
import grok1.engine.runner as runner_mod
from grok1.engine.golden import BLOCK_SIZE, engine_runner
from grok1.engine.scheduler import ScheduledChunk, Sequence
from grok1.model import matmul_bf16, moe_ref, route, summed
from grok1.ops import rmsnorm, rope
from grok1.ops.attention import GROK1_ATTENTION, paged_attention_ref

BF16 = torch.bfloat16


def distance(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.float(), ref.float()
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    return {"rel_l2": float((out - ref).norm() / ref.norm().clamp_min(1e-30)),
            "share_over_1ulp": float(((out - ref).abs() > ulp * 1.001).float().mean())}


class Recorder:
    """Wraps the runner module's op functions; `rows` collects (op, layer, step, distances)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.layer = -1
        self.step = ""
        self.after_moe = False

    def add(self, op: str, out: torch.Tensor, ref: torch.Tensor) -> None:
        self.rows.append({"op": op, "layer": self.layer, "step": self.step, **distance(out, ref)})

    def install(self, model: torch.nn.Module) -> None:
        """Wrap the ops the engine's PagedContext calls, and hook each layer's MoE."""
        real = {name: getattr(runner_mod, name) for name in
                ("rms_norm_op", "add_rms_norm", "project_many", "rope_and_cache",
                 "paged_attention")}
        rec = self

        def rms_norm_op(x, w, eps=rmsnorm.RMS_EPS):
            out = real["rms_norm_op"](x, w, eps)
            rec.layer = 0
            rec.add("attn_norm", out, rmsnorm.rms_norm(x, w, eps))
            return out

        def add_rms_norm(h, a, w_a, w_next, eps=rmsnorm.RMS_EPS):
            h_ref, x_ref = rmsnorm.add_rms_norm_ref(h, a, w_a, w_next, eps)
            h_out, x_out = real["add_rms_norm"](h, a, w_a, w_next, eps)
            rec.add("residual_norm.h", h_out, h_ref)
            rec.add("residual_norm.x", x_out, x_ref)
            if rec.after_moe:  # the norm after the MoE ends the layer
                rec.layer, rec.after_moe = rec.layer + 1, False
            return h_out, x_out

        def project_many(x, linears):
            outs = real["project_many"](x, linears)
            names = "qkv" if len(linears) == 3 else "o"  # attention's q/k/v, then its wo
            for name, lin, out in zip(names, linears, outs):
                rec.add(f"proj.{name}", summed(out), matmul_bf16(x, lin.dense()))
            return outs

        def rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots):
            kc, vc = k_cache.clone(), v_cache.clone()
            q_ref = rope.rope_and_cache_ref(q, k, v, cos, sin, kc, vc, slots)
            q_out = real["rope_and_cache"](q, k, v, cos, sin, k_cache, v_cache, slots)
            K, H = k_cache.shape[-2:]
            rec.add("rope.q", q_out, q_ref)
            rec.add("rope.k_cached", k_cache.view(-1, K, H)[slots], kc.view(-1, K, H)[slots])
            rec.add("rope.v_cached", v_cache.view(-1, K, H)[slots], vc.view(-1, K, H)[slots])
            return q_out

        def paged_attention(q, k_cache, v_cache, table, positions, plan, mult, real_slots,
                            math=GROK1_ATTENTION, temperature=None):
            out = real["paged_attention"](q, k_cache, v_cache, table, positions, plan, mult,
                                          real_slots, math, temperature)
            rec.add("attention", out, paged_attention_ref(q, k_cache, v_cache, table, positions,
                                                          plan, mult, real_slots, math))
            return out

        def moe_hook(module, inputs, out):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            _, gates, ids = route(x, module.router, module.top_k, module.router_softcap)
            from grok1.ops.router import route_op
            _, gates_k, ids_k = route_op(x, module.router, module.top_k, module.router_softcap)
            same = (ids_k.sort(-1).values == ids.sort(-1).values).all(-1).float().mean()
            rec.rows.append({"op": "router.same_experts", "layer": rec.layer,
                             "step": rec.step, "share": float(same)})
            rec.add("router.gates", gates_k, gates)
            rec.add("moe", summed(out).reshape(x.shape),
                    moe_ref(x, gates, ids, module.w_gate, module.w_up, module.w_down,
                            gelu=module.gelu, rounding=module.rounding))
            rec.after_moe = True

        for layer in model.layers:
            layer.moe.register_forward_hook(moe_hook)
        for name, fn in locals().copy().items():
            if name in real:
                setattr(runner_mod, name, fn)


def build(args) -> grok1.model.Grok1:
    if args.golden:
        g = Path(args.golden)
        return grok1.load(g / "checkpoint", config=g / "config.json", device=args.device)
    config = grok1.GrokConfig.preset("grok-1").replace(num_layers=args.layers)
    return grok1.random_weights(config, device=args.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--golden", help="golden folder (else random full-width int8 layers)")
    p.add_argument("--layers", type=int, default=2, help="random model's layers (default 2)")
    p.add_argument("--tokens", type=int, default=24, help="prompt length (default 24)")
    p.add_argument("--decode", type=int, default=4, help="decode steps (default 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(args)
    plain = build(args)  # the runner swaps kernel-backed modules into its own copy
    from grok1.ops._triton import interpreting
    if interpreting():  # the runner swaps kernel modules in only on CUDA
        runner_mod.apply_kernels(model)
    runner = engine_runner(model, use_cuda_graphs=False)
    rec = Recorder()
    rec.install(model)
    V = model.config.vocab_size
    tokens = torch.randint(3, V, (args.tokens + args.decode,), generator=torch.Generator()
                           .manual_seed(1)).tolist()
    seq = Sequence("op_diff", tokens[:args.tokens], args.tokens)
    seq.block_ids = list(range(1, 1 + -(-(args.tokens + args.decode) // BLOCK_SIZE)))
    logits = []
    rec.step = "prefill"
    logits.append(runner.execute([ScheduledChunk(seq, 0, args.tokens)]).float().cpu())
    for i in range(args.decode):
        rec.step = f"decode{i}"
        seq.token_ids.append(tokens[args.tokens + i])
        logits.append(runner.execute([ScheduledChunk(seq, len(seq.token_ids) - 1, 1)])
                      .float().cpu())
    with torch.no_grad():
        ref = plain(torch.tensor([tokens], device=args.device))[0].float().cpu()
    positions = [args.tokens - 1 + i for i in range(args.decode + 1)]
    end_to_end = [distance(lg[0], ref[p]) for lg, p in zip(logits, positions)]
    print(f"{'op':24s} {'layer':>5s} {'step':>8s} {'rel_l2':>9s} {'>1ulp':>7s}")
    for r in rec.rows:
        if "share" in r:
            print(f"{r['op']:24s} {r['layer']:5d} {r['step']:>8s} same-experts {r['share']:.3f}")
        else:
            print(f"{r['op']:24s} {r['layer']:5d} {r['step']:>8s} {r['rel_l2']:9.2e} "
                  f"{r['share_over_1ulp']:7.3f}")
    for p_, d in zip(positions, end_to_end):
        print(f"logits vs plain model, position {p_}: rel_l2 {d['rel_l2']:.3e}")
    worst = {}
    for r in rec.rows:
        if "rel_l2" in r:
            worst[r["op"]] = max(worst.get(r["op"], 0.0), r["rel_l2"])
    print("worst per op:", json.dumps({k: f"{v:.2e}" for k, v in worst.items()}))
    if args.out:
        gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        Path(args.out).write_text(json.dumps({"kind": "op_diff", "gpu": gpu,
                                              "golden": bool(args.golden), "rows": rec.rows,
                                              "logits_vs_plain": end_to_end,
                                              "worst_per_op": worst}, indent=1))


if __name__ == "__main__":
    main()
