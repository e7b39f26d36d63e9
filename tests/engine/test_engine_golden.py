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


ON_DEVICES = pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])


@ON_DEVICES
def test_engine_meets_the_golden_bounds_through_the_paged_cache(golden_dir, device):
    """golden/README.md's judge on the engine itself: every golden position through the runner's
    varlen prefill and its decode batches (CUDA graphs on a GPU), teacher-forced
    (grok1.engine.golden), and the golden's own prefill + decode case. Measured: CPU the plain
    model's own figures (0.99 % on the full case, share 0.97); H100 before the numerics issue
    19-29 % per case and share 0.0 (int8 products scaled late, unnormalised softmax rounding),
    after: within the bounds."""
    from grok1.engine.golden import engine_golden_pairs, engine_runner
    from grok1.golden import golden_metrics, golden_pass, load_cases

    model = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json",
                       device=device)
    m = golden_metrics(engine_golden_pairs(engine_runner(model), load_cases(golden_dir)))
    assert m["positions"] == 135  # 2 x 24 + 15 real padded, twice (prefill, decode), + 1 + 8
    assert golden_pass(m), m
    if device == "cpu":  # the twins in the plain model's order: its own figures
        assert m["share_within_2pct"] >= 0.95 and m["top1_within_ulp"] >= 0.95, m


def test_engine_logits_match_plain_model_on_golden_checkpoint(golden_dir):
    device = "cpu"
    model = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json",
                       device=device)
    plain = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json",
                       device=device)
    prompts, params = golden_prompts(golden_dir, seed=0)
    assert any(0 in p for p in prompts.values()), "want pad tokens inside a prompt"
    # 5 requests at most, 16 blocks of 8: requests join, leave and get preempted
    engine = Engine(model, max_batch_size=5, block_size=8, num_blocks=16, max_model_len=64,
                    max_num_batched_tokens=16, record_logits=True)
    got = drive(engine, prompts, params)
    assert {r: len(t) for r, t in got.items()} == {r: p.max_tokens for r, p in params.items()}
    assert engine.stats().kv_blocks_used == 0
    # The twins in the plain model's order of operations, so only batch-shape effects remain
    # (measured ~1e-3). On a GPU this random 11-layer model amplifies any last-bit difference of
    # the kernels (the golden README: accumulation order alone moves it 0.3-5 %), so there the
    # engine is judged by the golden's own bounds (test above) and, for requests joining and
    # leaving, on models with real margins (tests/engine/test_engine_llm.py). Random weights have few
    # clear top-1 margins: greedy tokens are checked only where the margin is real.
    check_against_plain_model(plain, engine, prompts, got, tol=1e-2, min_clear=0.0)


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


@ON_DEVICES
def test_engine_meets_the_grok2_golden_bounds_through_the_paged_cache(golden2_dir, device):
    """The Grok-2 golden (../shared/grok2/golden: SGLang's math) through the engine: every
    position of its three rows teacher-forced through the runner's varlen prefill and its
    decode batches (CUDA graphs on a GPU), judged by its README's bf16 bounds (rel <= 0.07,
    median per-position <= 0.06, top-1 >= 0.87). On the CPU the engine's twins are the plain
    model's functions, so the engine also lands next to the plain bf16 model's logits."""
    from grok1.engine.golden import engine_rows_logits, engine_runner
    from grok1.golden import grok2_bf16_pass, grok2_figures

    case = np.load(golden2_dir / "golden.npz")
    tokens, golden = torch.from_numpy(case["tokens"]), torch.from_numpy(case["logits"])
    model = grok1.load(golden2_dir, device=device)
    prefill, decode = engine_rows_logits(engine_runner(model), tokens)
    for path, logits in (("prefill", prefill), ("decode", decode)):
        f = grok2_figures(logits, golden)
        assert grok2_bf16_pass(f), (path, f)
    if device == "cpu":
        with torch.no_grad():
            plain = model(tokens).float()
        for logits in (prefill, decode):
            assert grok2_figures(logits, plain)["rel"] < 1e-2
