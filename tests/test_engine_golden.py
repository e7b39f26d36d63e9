"""The engine on real checkpoints against the plain model: the golden checkpoint (xAI's release
format, random weights; mixed batches joining and leaving mid-run, pad tokens inside prompts)
and the embedded default model (greedy text equal to grok1.generation's)."""

import numpy as np
import pytest
import torch
from _engine_helpers import check_against_plain_model, drive

import grok1
from grok1.engine.llm import Engine, SamplingParams

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def golden_prompts(golden_dir, seed):
    """The golden cases' token rows (one holds pad tokens from position 15 on), cut to varied
    lengths, plus random prompts; request r gets its own max_tokens so requests leave at
    different steps."""
    cases = np.load(golden_dir / "golden.npz")
    rows = [*cases["full_tokens"].tolist(), cases["padded_tokens"][0].tolist(),
            cases["prefill_tokens"][0, :int(cases["prefill_length"][0])].tolist()]
    g = torch.Generator().manual_seed(seed)
    rows += [torch.randint(3, 1024, (int(n),), generator=g).tolist() for n in (5, 17, 1)]
    rows[0] = rows[0][:13]
    rows[2] = rows[2][:20]  # ends inside the pad run
    prompts = {f"g{i}": r for i, r in enumerate(rows)}
    params = {r: SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True)
              for i, r in enumerate(prompts)}
    return prompts, params


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_engine_logits_match_plain_model_on_golden_checkpoint(golden_dir, device):
    model = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json",
                       device=device)
    plain = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json",
                       device=device)  # the engine swaps kernels into its model on CUDA
    prompts, params = golden_prompts(golden_dir, seed=0)
    assert any(0 in p for p in prompts.values()), "want pad tokens inside a prompt"
    # 5 requests at most, 16 blocks of 8: requests join, leave and (on CPU) get preempted
    engine = Engine(model, max_batch_size=5, block_size=8, num_blocks=16, max_model_len=64,
                    max_num_batched_tokens=16, record_logits=True)
    got = drive(engine, prompts, params)
    assert {r: len(t) for r, t in got.items()} == {r: p.max_tokens for r, p in params.items()}
    assert engine.stats().kv_blocks_used == 0
    # CPU: the twins in the plain model's order of operations, so only batch-shape effects in
    # the bf16 matmuls remain (measured ~1e-3). GPU: the kernels' own bf16 rounding (h rounded
    # before the down-projection, f32 sums in another order) compounds through this random
    # 11-layer model, which amplifies rounding (golden README): 0.1, while any indexing, mask or
    # cache error gives O(1). Random weights have few clear top-1 margins: greedy tokens are
    # checked only where the margin is real.
    tol = 1e-2 if device == "cpu" else 0.1
    check_against_plain_model(plain, engine, prompts, got, tol=tol, min_clear=0.0)


def test_engine_greedy_text_equals_plain_generation_on_default_model():
    from grok1 import assets
    from grok1.generation import generate
    from grok1.tokenizer import Tokenizer
    folder = assets.default_model_dir()
    if not folder.exists() or not any(folder.iterdir()):
        pytest.skip(f"embedded default model not found at {folder} (not trained yet)")
    model = grok1.load(folder, device=DEV)
    plain = grok1.load(folder, device=DEV)
    tok = Tokenizer(folder / "tokenizer.model")  # the model's own (Shakespeare) vocabulary
    texts = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING HENRY", "O, what a"]
    prompts = [tok.encode(t) for t in texts]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = [g.token_ids for g in generate(plain, prompts, params)]
    engine = Engine(model, max_batch_size=4, max_model_len=min(256, model.config.sequence_len))
    got = drive(engine, {f"d{i}": p for i, p in enumerate(prompts)}, params)
    assert [tok.decode(got[f"d{i}"]) for i in range(len(texts))] == \
        [tok.decode(w) for w in want]
