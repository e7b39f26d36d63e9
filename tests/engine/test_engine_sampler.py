"""vLLM's sampling extras in the engine's batch sampler (issue 17): each changes the logits as
vLLM defines it, row by row within one batch, and shows its effect on what the engine
generates."""

import math

import torch
from _engine_helpers import PEAKED

from grok1 import random_weights
from grok1.config import GrokConfig
from grok1.engine.llm import LLM
from grok1.engine.sampler import process_logits
from grok1.sampling import SamplingParams

V = 8


def test_each_extra_changes_only_its_own_row_as_vllm_defines_it():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.0, -2.0, 3.0, 0.25]]).repeat(6, 1)
    params = [SamplingParams(),  # untouched
              SamplingParams(logit_bias=((1, 5.0), (6, -100.0))),
              SamplingParams(min_tokens=3),
              SamplingParams(repetition_penalty=2.0),
              SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(min_p=0.2, temperature=0.5)]
    prompts = [[0, 1]] * 6
    outputs = [[4, 4, 5]] * 2 + [[4, 4]] + [[4, 4, 5]] * 3
    stops = [frozenset({6, 7})] * 6
    x = process_logits(logits, params, prompts, outputs, stops)
    want = logits.clone()
    want[1, 1] += 5.0
    want[1, 6] -= 100.0
    want[2, [6, 7]] = float("-inf")  # 2 outputs < min_tokens=3: no stop token yet
    for t in (0, 1, 4, 5):  # seen in the prompt or the output
        v = want[3, t]
        want[3, t] = v / 2.0 if v > 0 else v * 2.0
    want[4, 4] -= 0.5 + 0.25 * 2  # twice in the output
    want[4, 5] -= 0.5 + 0.25
    # min_p 0.2 at T=0.5: keep logit >= 3 + 0.5 ln 0.2 = 2.195
    want[5] = torch.where(logits[5] >= 3.0 + 0.5 * math.log(0.2), logits[5], float("-inf"))
    assert torch.equal(x, want)


def test_min_tokens_holds_back_stops_and_min_p_keeps_draws_near_the_top():
    x = process_logits(torch.zeros(1, V), [SamplingParams(min_tokens=2)], [[1]], [[3, 3]],
                       [frozenset({2})])
    assert torch.isfinite(x).all()  # 2 outputs: min_tokens reached, stops allowed again
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0]]) + 1e-9
    params = [SamplingParams(min_p=0.5, temperature=1.0)]
    kept = process_logits(probs.log(), params, [[]], [[]], [frozenset()])
    assert torch.isfinite(kept[0]).tolist() == [True, True] + [False] * 6  # p >= 0.25 only


def test_extras_change_what_the_engine_generates():
    model = random_weights(GrokConfig.preset("tiny"), quantized=False, **PEAKED)
    llm = LLM(model, max_model_len=64)
    prompt = [5, 9, 17, 33]
    base = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
    free = llm.generate([prompt], SamplingParams(**base))[0].token_ids
    forced = llm.generate([prompt], SamplingParams(**base, logit_bias=((40, 100.0),)))[0]
    assert forced.token_ids == [40] * 6
    banned = llm.generate([prompt], SamplingParams(**base, logit_bias=((free[0], -100.0),)))[0]
    assert banned.token_ids[0] != free[0]
    # the free run's first token as a stop token ends at once, unless min_tokens holds it back
    stop = dict(base, ignore_eos=True, stop_token_ids=(free[0],))
    assert llm.generate([prompt], SamplingParams(**stop))[0].token_ids == []
    held = llm.generate([prompt], SamplingParams(**stop, min_tokens=3))[0].token_ids
    assert len(held) >= 3 and free[0] not in held[:3]
    # greedy repeats the prompt's last token; a large penalty on generated tokens never picks
    # a token twice
    assert free == [33] * 6
    for penalty in ({"frequency_penalty": 100.0}, {"presence_penalty": 100.0}):
        unrepeated = llm.generate([prompt], SamplingParams(**base, **penalty))[0].token_ids
        assert len(set(unrepeated)) == 6, penalty
