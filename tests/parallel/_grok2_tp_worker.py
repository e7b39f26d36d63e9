"""One torchrun rank of tests/parallel/test_grok2_parallel.py: load a Grok-2 release folder
through grok1.load with a mesh (this rank's slices only), run the same tokens in float32 and
bf16, as a full forward and as a prefill plus decode steps through a KV cache of the rank's
local shape, then greedy tokens through the serving engine (bf16), and (rank 0) save them
for the test to compare with one process's.

    torchrun --nproc-per-node 8 tests/parallel/_grok2_tp_worker.py FOLDER TOKENS.pt OUT.pt \
        [MOE UNEMBED]      # the MoE and unembedding splits (default tp, vocab)
"""

import sys

import torch

import grok1
from grok1.model import BF16, Grok1, KVCache
from grok1.parallel.mesh import init_distributed, shutdown

DECODE_STEPS = 6
ENGINE_TOKENS = 6


def run(model: Grok1, tokens_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full-sequence logits, and prefill of all but the last DECODE_STEPS tokens then one
    token at a time through the cache (the logits of positions T-1-DECODE_STEPS .. T-2)."""
    B, T = tokens_BT.shape
    full = model(tokens_BT).float()
    cache = KVCache.allocate(model.local_config, B, T, dtype=model.compute_dtype)
    steps = [model(tokens_BT[:, :T - DECODE_STEPS], cache, last_only=True).float()]
    for t in range(T - DECODE_STEPS, T - 1):
        steps.append(model(tokens_BT[:, t:t + 1], cache).float())
    return {"full": full, "cached": torch.cat(steps, dim=1)}


def engine_greedy(model: Grok1, tokens_BT: torch.Tensor) -> list[list[int]]:
    """ENGINE_TOKENS greedy tokens per row through grok1.engine (every rank runs the same
    deterministic schedule, so the collectives line up)."""
    from grok1.engine.llm import LLM
    from grok1.sampling import SamplingParams

    params = SamplingParams(max_tokens=ENGINE_TOKENS, temperature=0.0, ignore_eos=True)
    llm = LLM(model, max_model_len=64, max_batch_size=4)
    return [o.token_ids for o in llm.generate(tokens_BT.tolist(), params)]


def main() -> None:
    folder, tokens_path, out_path = sys.argv[1:4]
    moe, unembed = sys.argv[4:6] if len(sys.argv) > 4 else ("tp", "vocab")
    torch.set_num_threads(1)
    mesh = init_distributed(device="cpu", backend="gloo")
    tokens = torch.load(tokens_path, weights_only=True)
    out = {}
    with torch.no_grad():
        for name, dtype in (("float32", torch.float32), ("bf16", BF16)):
            model = grok1.load(folder, mesh=mesh, dtype=dtype, moe=moe, unembed=unembed,
                               progress=False)
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            for case, logits in run(model, tokens).items():
                out[f"{name}_{case}"] = logits
        out["rank0_shapes"] = shapes
        # the serving engine over the same ranks (bf16 kernels' twins on the CPU, paged cache)
        out["engine_tokens"] = engine_greedy(model, tokens)
    if mesh.is_main:
        torch.save(out, out_path)
    shutdown()


if __name__ == "__main__":
    main()
