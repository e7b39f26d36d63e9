"""What evaluation clients (lm-eval, vLLM's) need from the server (issue 17): prompt logprobs
from the engine (echo + logprobs, max_tokens=0, vLLM's prompt_logprobs), the tokenizer
endpoints, /v1/models/{id}, /version, unknown fields accepted with a warning, and the sampled
token among the legacy top_logprobs. Against a real server on 127.0.0.1 over the embedded model."""

import json
import logging

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_server import KEY, MODEL, PROMPT, _post, client, server  # noqa: F401 - fixtures


def engine_prompt_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """log p(ids[p] | ids[:p]) for p >= 1 from the model's own forward."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids]))[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_echo_logprobs_with_max_tokens_0_score_every_prompt_token(client, server):
    tokenizer, engine = server[2], server[3]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True,
                                  logprobs=1)
    (choice,) = r.choices
    ids = tokenizer.encode(PROMPT)
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = engine_prompt_logprobs(engine, ids)
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=2e-2)
    for tok, top, v in zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:]):
        assert top[tok] == v and 1 <= len(top) <= 2  # the top one and the token itself
        assert max(top.values()) >= v


def test_vllm_prompt_logprobs_give_ids_ranks_and_alternatives(server):
    url, tokenizer, engine = server[0], server[2], server[3]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 3}
    r = _post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["prompt_logprobs"]
    ids = tokenizer.encode(PROMPT)
    assert len(got) == len(ids) and got[0] is None
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), dim=-1)
    for p in range(1, len(ids)):
        entry = got[p]
        mine = entry[str(ids[p])]
        assert abs(mine["logprob"] - logp[p - 1, ids[p]].item()) < 2e-2
        assert mine["rank"] == int((logp[p - 1] > logp[p - 1, ids[p]]).sum()) + 1
        assert mine["decoded_token"] == tokenizer.decode([ids[p]])
        # the 3 likeliest, plus the token itself when it is not one of them
        assert sorted(e["rank"] for e in entry.values()) == sorted({1, 2, 3, mine["rank"]})


def test_sampled_token_is_among_top_logprobs_and_logprobs_0_gives_it_alone(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=5,
              extra_body={"ignore_eos": True})
    for k in (0, 1):
        lp = client.completions.create(**kw, logprobs=k).choices[0].logprobs
        for tok, top, v in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
            assert top[tok] == v  # OpenAI: up to logprobs + 1 entries, the sampled one included
            assert len(top) <= k + 1
        if k == 0:
            assert all(len(top) == 1 for top in lp.top_logprobs)


def test_tokenizer_endpoints_in_vllm_shapes(server):
    url, tokenizer, engine = server[0], server[2], server[3]
    info = httpx.get(url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["model_max_length"] == engine.max_model_len
    assert info["vocab_size"] == engine.config.vocab_size
    r = _post(url, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False}).json()
    assert r == {"count": len(tokenizer.encode(PROMPT)), "max_model_len": engine.max_model_len,
                 "tokens": tokenizer.encode(PROMPT)}
    assert _post(url, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": PROMPT}
    if "eos_token" in info:  # a special piece's text is its id (lm-eval finds eos this way)
        eos = _post(url, "/tokenize", {"prompt": info["eos_token"]}).json()["tokens"]
        assert eos == [engine.config.eos_token]
    chat = _post(url, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == tokenizer.encode("User: Hi\nAssistant:")
    bad = _post(url, "/detokenize", {"tokens": [engine.config.vocab_size]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = _post(url, "/tokenize", {"prompt": "a", "messages": [{"role": "user"}]})
    assert both.status_code == 400 and "either prompt or messages" in both.text


def test_model_by_id_and_version(server):
    url = server[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    card = httpx.get(f"{url}/v1/models/{MODEL}", headers=auth)
    assert card.status_code == 200 and card.json()["id"] == MODEL
    missing = httpx.get(f"{url}/v1/models/other", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    from grok1.server.app import grok1_version
    assert httpx.get(url + "/version").json() == {"version": grok1_version}


def test_unknown_fields_are_accepted_with_one_warning_naming_them(server, caplog):
    url = server[0]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "store": False,
            "metadata": {"k": "v"}, "service_tier": "auto"}
    with caplog.at_level(logging.WARNING, logger="grok1.server"):
        r = _post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    warnings = [rec.getMessage() for rec in caplog.records if "unknown" in rec.getMessage()]
    assert warnings == ["ignoring unknown request fields: metadata, service_tier, store"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grok1.server"):
        r = _post(url, "/v1/completions", {**body, **{f"x{i}\nforged": 1 for i in range(20)},
                                           "y" * 1000: 1})
    assert r.status_code == 200, r.text
    (line,) = [rec.getMessage() for rec in caplog.records if "unknown" in rec.getMessage()]
    assert "\n" not in line and len(line) < 16 * 80 and line.endswith("(and 8 more)")
    # known fields stay strict
    bad = _post(url, "/v1/completions", {**body, "max_tokens": "2"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def _streamed(client, **kw):
    """(text, logprob tokens, usage) per choice of a streamed completion."""
    text, tokens, usage = {}, {}, None
    for chunk in client.completions.create(**kw, stream=True,
                                           stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            text[ch.index] = text.get(ch.index, "") + ch.text
            tokens.setdefault(ch.index, []).extend(ch.logprobs.tokens if ch.logprobs else [])
    return text, tokens, usage


def test_a_stop_string_is_not_in_usage_nor_logprobs_streamed_or_not(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})
    free = client.completions.create(**kw).choices[0]
    tokens = free.logprobs.tokens
    # a stop string spelled by a token from the 6th on: the tokens before it make the text
    stop = next(t for t in tokens[5:] if t.strip())
    cut = free.text.index(stop, sum(map(len, tokens[:5])))
    kept = sum(1 for o in free.logprobs.text_offset if o < cut)
    stopped = client.completions.create(**kw, stop=[stop], n=2)
    for choice in stopped.choices:
        assert choice.finish_reason == "stop" and choice.text == free.text[:cut]
        assert "".join(choice.logprobs.tokens) == choice.text[:sum(map(len, tokens[:kept]))]
        assert len(choice.logprobs.tokens) == kept
    assert stopped.usage.completion_tokens == 2 * kept  # the stop string's tokens not counted
    text, streamed_tokens, usage = _streamed(client, **kw, stop=[stop], n=2)
    assert text == {0: free.text[:cut], 1: free.text[:cut]}
    assert streamed_tokens == {0: tokens[:kept], 1: tokens[:kept]}
    assert usage.completion_tokens == 2 * kept


def test_chat_logprobs_spell_the_content_whose_leading_whitespace_is_dropped(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
              temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens
    streamed, tokens = "", []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            streamed += ch.delta.content or ""
            tokens += [e.token for e in (ch.logprobs.content if ch.logprobs else [])]
    assert streamed == r.choices[0].message.content == "".join(tokens)


def test_vllm_sampling_extras_are_applied(server):
    url, tokenizer, engine = server[0], server[2], server[3]
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "logprobs": 0}

    def tokens(**extra):
        r = _post(url, "/v1/completions", {**base, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    free = tokens()
    first = tokenizer.encode(PROMPT + free["text"])[len(tokenizer.encode(PROMPT))]
    forced_id = tokenizer.encode(" the")[-1]
    forced = tokens(logit_bias={str(forced_id): 100})
    assert forced["logprobs"]["tokens"] == [" the"] * 6
    assert tokens(logit_bias={str(first): -100})["text"] != free["text"]
    assert tokens(stop_token_ids=[first])["text"] == ""  # the first token stops at once
    held = tokens(stop_token_ids=[first], min_tokens=2)
    assert len(held["logprobs"]["tokens"]) >= 2
    # a prompt whose greedy continuation repeats tokens: each penalty changes it
    repeating = {"prompt": "O Romeo, Romeo, Romeo, Romeo,", "max_tokens": 8}
    unpenalized = tokens(**repeating)["text"]
    for penalty in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        assert tokens(**repeating, **{penalty: 2.0})["text"] != unpenalized, penalty
    stop = free["text"][2:5]
    with_stop = tokens(stop=[stop], include_stop_str_in_output=True)
    assert with_stop["text"] == free["text"][:free["text"].index(stop) + len(stop)]
    assert tokens(min_p=0.5, skip_special_tokens=True)["text"] == free["text"]  # greedy: argmax
    bad = _post(url, "/v1/completions", {**base, "logit_bias": {str(10**6): 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"


def test_a_stop_token_is_the_last_logprob_and_counted_as_openai_and_vllm_do(server):
    """lm-eval scores with echo, max_tokens=1 and drops the last entry as the generated token:
    when that token is eos, it must still be listed (else a prompt token is dropped)."""
    url, tokenizer, engine = server[0], server[2], server[3]
    eos = engine.config.eos_token
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "echo": True,
            "logprobs": 1, "logit_bias": {str(eos): 100}}
    for stream in (False, True):
        r = _post(url, "/v1/completions", {**body, "stream": stream,
                                            **({"stream_options": {"include_usage": True}}
                                               if stream else {})})
        assert r.status_code == 200, r.text
        if stream:
            events = [json.loads(line[6:]) for line in r.text.split("\n\n")
                      if line.startswith("data: {")]
            lp = [e["choices"][0]["logprobs"]["token_logprobs"] for e in events if e["choices"]]
            token_logprobs = [v for chunk in lp for v in chunk]
            usage = events[-1]["usage"]
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
        else:
            choice = r.json()["choices"][0]
            token_logprobs, usage = choice["logprobs"]["token_logprobs"], r.json()["usage"]
            finish = choice["finish_reason"]
        n_prompt = len(tokenizer.encode(PROMPT))
        assert finish == "stop" and usage["completion_tokens"] == 1
        assert len(token_logprobs) == n_prompt + 1  # the prompt's, then eos's
        assert token_logprobs[:-1][1:] == pytest.approx(
            engine_prompt_logprobs(engine, tokenizer.encode(PROMPT)).tolist(), abs=2e-2)
