"""The engine's kernel path on a fixed seeded int8 model: logits to compare across commits.

Without a GPU, Triton's interpreter runs the kernels on the CPU (slowly, and with bf16
conversions that truncate, so the logits are not the GPU's), but the same kernels fed the same
inputs give the same bits: a refactor of the engine's wiring that keeps every kernel call equal
gives bit-equal logits. Prefill (9 tokens, two sequences), decode of one sequence (the split-K
GEMV and its partial sums) and of two (the grouped-GEMM MoE), two layers at width 256:

    pip install triton==3.6.0 numpy==2.2.6     # a separate venv: the interpreter's numpy
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/engine_interp_logits.py /tmp/new.pt
    (the same at the other commit's tree, then torch.equal on the saved tensors)
"""

from __future__ import annotations

import sys

import torch

import grok1.engine.runner as runner_mod
from grok1.config import GrokConfig
from grok1.engine.golden import engine_runner
from grok1.engine.scheduler import ScheduledChunk, Sequence
from grok1.model import Grok1

CONFIG = GrokConfig.preset("debug").replace(emb_size=256, key_size=64, num_q_heads=4,
                                            num_kv_heads=2, sequence_len=256, num_layers=2,
                                            widening_factor=1.5)  # widths the kernels tile


def build() -> Grok1:
    """Seeded int8 weights filled by name in sorted order: the same model at any commit."""
    m = Grok1(CONFIG, quantized=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in sorted(list(m.named_parameters()) + list(m.named_buffers())):
            if t.dtype == torch.int8:
                t.copy_(torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8))
            elif name.endswith("scales"):
                t.copy_((torch.rand(t.shape, generator=g) + 0.5) * 0.2 / (127 * 16))
            elif name.endswith("scale"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("router"):  # decisive routing: no near-ties between experts
                t.copy_(torch.randn(t.shape, generator=g) * 8 / 16)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return m.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(out_path: str) -> None:
    model, plain = build(), build()
    runner_mod.apply_kernels(model)  # on CUDA the runner does it; here the interpreter runs them
    runner = engine_runner(model, use_cuda_graphs=False)
    g = torch.Generator().manual_seed(1)
    toks = [torch.randint(3, CONFIG.vocab_size, (12,), generator=g).tolist() for _ in range(2)]
    seqs = [Sequence(f"s{i}", t[:9], 9) for i, t in enumerate(toks)]
    for i, s in enumerate(seqs):
        s.block_ids = [1 + 2 * i, 2 + 2 * i]
    prefill = [runner.execute([ScheduledChunk(s, 0, 9)]) for s in seqs]
    for step in range(2):
        for s, t in zip(seqs, toks):
            s.token_ids.append(t[9 + step])
        one = runner.execute([ScheduledChunk(seqs[0], len(seqs[0].token_ids) - 1, 1)])
        both = runner.execute([ScheduledChunk(s, len(s.token_ids) - 1, 1) for s in seqs])
    ref = plain(torch.tensor(toks)[:, :11])
    print("decode vs the plain model (interpreter bf16 truncation): M=2",
          rel(both[0], ref[0, 10]), rel(both[1], ref[1, 10]), "M=1", rel(one[0], ref[0, 10]))
    torch.save({"out": prefill, "one": one, "both": both}, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
