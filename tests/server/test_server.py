"""The OpenAI-compatible server end to end: uvicorn on 127.0.0.1, the official `openai` client.

Outputs are checked against each other (stream vs. non-stream, seed vs. seed, stop vs. no stop),
so the tests hold for any model; the server runs the real engine on the embedded default model.
"""

import json
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_server_bridge import FakeEngine
from test_server_units import ByteTokenizer

import grok1
from grok1.assets import default_model_dir
from grok1.engine.llm import Engine
from grok1.server.app import create_app
from grok1.server.cli_serve import serve_in_thread
from grok1.server.protocol import ChatMessage
from grok1.server.serving import chat_prompt

MODEL = "grok1-test"
KEY = "sk-test-key"
PROMPT = "ROMEO: But soft, what light"


DEFAULT_MODEL = default_model_dir()


def make_engine_and_tokenizer(**engine_kwargs):
    """The real engine on the embedded default model (a tiny random Grok1 with a byte-level
    tokenizer until the default model exists)."""
    if (DEFAULT_MODEL / "model.safetensors").exists():
        model = grok1.load(DEFAULT_MODEL, device="cpu", progress=False)
        tokenizer = grok1.Tokenizer(DEFAULT_MODEL / "tokenizer.model")
    else:
        model, tokenizer = grok1.random_weights("tiny", quantized=False), ByteTokenizer()
    return Engine(model, **engine_kwargs), tokenizer


@pytest.fixture(scope="module")
def server():
    engine, tokenizer = make_engine_and_tokenizer(max_batch_size=16)
    app = create_app(engine, tokenizer, MODEL, api_key=KEY, max_n=8)
    with serve_in_thread(app) as url:
        yield url, app, tokenizer, engine


@pytest.fixture(scope="module")
def slow_server():
    """A scripted engine that takes 10 ms a step, for cancellation and back-pressure timing."""
    engine = FakeEngine(step_delay_s=0.01)
    app = create_app(engine, ByteTokenizer(), MODEL, max_pending=2)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _engine_idle(app, timeout_s=10.0):
    """Engine stats once nothing is admitted any more (read on the engine thread)."""
    bridge = app.state.bridge
    deadline = time.monotonic() + timeout_s
    while bridge.num_pending and time.monotonic() < deadline:
        time.sleep(0.01)
    return bridge.call_threadsafe(lambda e: e.stats()).result(timeout=timeout_s)


def _post(url, path, body, key=KEY, timeout=30.0):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(url + path, content=body if isinstance(body, (bytes, str)) else
                      json.dumps(body), headers=headers, timeout=timeout)


# ---- generation ------------------------------------------------------------------------------

def test_completion_returns_text_finish_reason_and_usage(client, server):
    tokenizer = server[2]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_greedy_completion_is_deterministic_and_echo_prepends_the_prompt(client):
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw, echo=True).choices[0].text
    assert b == PROMPT + a


def test_chat_completion_answers_from_the_transcript_prompt(client, server):
    tokenizer = server[2]
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.content == choice.message.content.lstrip()
    assert "\nUser:" not in choice.message.content
    prompt = chat_prompt([ChatMessage(**m) for m in messages])
    assert prompt == "System: You are terse.\nUser: Say hi\nAssistant:"
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert 1 <= r.usage.completion_tokens <= 6


def test_streamed_completion_equals_the_non_streamed_one_and_ends_with_usage(client):
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    echoed = "".join(c.choices[0].text for c in client.completions.create(
        **kw, stream=True, echo=True) if c.choices)
    assert echoed == PROMPT + full.choices[0].text


def test_streamed_chat_starts_with_the_role_and_matches_the_non_streamed_reply(client):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
              "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_raw_sse_stream_is_data_lines_ending_with_done(server):
    url = server[0]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_n_choices_are_indexed_and_seeded_draws_differ(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=4, seed=7,
                                  temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) > 1
    assert r.usage.completion_tokens == 32
    assert r.usage.prompt_tokens == client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1).usage.prompt_tokens  # counted once, not n times
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=4, seed=7,
                                      temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_streamed_n_choices_each_get_their_text_and_finish(client):
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "n": 3, "seed": 11, "temperature": 1.0,
              "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw)
    texts, finished = {}, {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finished == {0: "length", 1: "length", 2: "length"}


def test_same_seed_same_text_and_different_seeds_differ(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, seed=seed,
                                         temperature=1.0, extra_body={"ignore_eos": True}
                                         ).choices[0].text
    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_stop_string_truncates_the_completion_and_finishes_with_stop(client):
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**kw).choices[0].text
    assert len(text) >= 4
    stop = text[2:4]  # a piece of the greedy output: the same run must stop before it
    cut = text.index(stop)
    r = client.completions.create(**kw, stop=[stop, "\x00never"])
    assert r.choices[0].text == text[:cut] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        **kw, stop=stop, stream=True) if c.choices)
    assert streamed == text[:cut]


def test_completion_logprobs_cover_each_generated_token(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(4)]
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logprobs=1, echo=True, extra_body={"ignore_eos": True})
    elp = echoed.choices[0].logprobs
    n_prompt = echoed.usage.prompt_tokens
    assert elp.token_logprobs[0] is None  # nothing precedes the first token
    assert all(v <= 0 for v in elp.token_logprobs[1:n_prompt])  # scored (issue 17)
    assert elp.token_logprobs[n_prompt:] == lp.token_logprobs
    assert "".join(elp.tokens) == echoed.choices[0].text


def test_chat_logprobs_list_each_token_with_its_alternatives(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(e.logprob <= 0 and 1 <= len(e.top_logprobs) <= 2 for e in content)
    assert all(bytes(e.bytes).decode(errors="replace") == e.token for e in content)


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),  # 0 scores the prompt (issue 17)
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "", "max_tokens": 2}, "prompt"),
    ({"prompt": [], "max_tokens": 2}, "prompt"),
    ({"prompt": [1, 999999]}, "prompt"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"max_tokens": 2}, "prompt"),
])
def test_bad_completion_values_get_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as exc:  # extra_body: sent as given, unchecked
        client.completions.create(model=MODEL, prompt=openai.omit, extra_body=body)
    assert exc.value.status_code == 400
    err = exc.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"] or "prompt" in err["message"]


def test_prompt_longer_than_the_context_gets_400_with_the_numbers(client, server):
    engine = server[3]
    L = engine.max_model_len
    prompt = [5] * (L - 3)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=10)
    msg = exc.value.body["message"]
    assert exc.value.body["code"] == "context_length_exceeded"
    assert f"{L - 3} tokens" in msg and "max_tokens is 10" in msg and str(L) in msg
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                               "content": "hello " * L}])


def test_malformed_json_and_non_object_bodies_get_400(server):
    url = server[0]
    for body in (b'{"model": "grok1-test", "prompt": ', b"\xff\xfe", b"[1, 2]", b""):
        r = _post(url, "/v1/completions", body)
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["code"] == "invalid_json"


def test_unknown_model_gets_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"


def test_chat_with_a_tool_role_or_tools_gets_400(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x",
                                                               "tool_call_id": "1"}])
    assert exc.value.body["param"] == "messages.0.role"


def test_missing_or_wrong_api_key_gets_401(server):
    url = server[0]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.body["code"] == "invalid_api_key"
    r = _post(url, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None)
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200  # health and metrics need no key


def test_unknown_route_and_wrong_method_get_openai_error_bodies(server):
    url = server[0]
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = httpx.get(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def test_oversized_body_gets_413(server):
    r = _post(server[0], "/v1/completions", b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


# ---- models, health, metrics, cancellation -----------------------------------------------------

def test_models_lists_the_served_model(client, server):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.object == "model"
    assert card.model_extra["max_model_len"] == server[3].max_model_len


def test_metrics_report_requests_latencies_tokens_and_cache(client, server):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                              extra_body={"ignore_eos": True})
    text = httpx.get(server[0] + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['grok1_http_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values["grok1_time_to_first_token_seconds_count"] >= 1
    assert values["grok1_inter_token_latency_seconds_count"] >= 2
    assert values["grok1_generation_tokens_total"] >= 3
    assert values["grok1_kv_cache_blocks_total"] > 0
    for gauge in ("grok1_num_requests_waiting", "grok1_num_requests_running",
                  "grok1_kv_cache_blocks_used", "grok1_kv_cache_usage_ratio"):
        assert gauge in values


def _blocks_in_use(app) -> int:
    return app.state.bridge.call_threadsafe(lambda e: e.stats().kv_blocks_used).result(10)


def test_client_disconnect_mid_stream_frees_the_cache_at_once(slow_server):
    url, app = slow_server
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 90, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the connection
        next(lines)
        assert _blocks_in_use(app) > 0
    t0 = time.monotonic()
    stats = _engine_idle(app)
    assert time.monotonic() - t0 < 0.5  # 90 tokens at 10 ms a step would take 0.9 s
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)


def test_client_timeout_on_a_non_streamed_request_aborts_it(slow_server):
    url, app = slow_server
    with pytest.raises(httpx.ReadTimeout):
        _post(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 90},
              timeout=0.1)
    t0 = time.monotonic()
    stats = _engine_idle(app)
    assert time.monotonic() - t0 < 0.5
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)


def test_full_queue_gets_503_with_retry_after(slow_server):
    url, app = slow_server
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 50, "n": 2, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)  # both engine requests admitted: the server's limit
        busy = _post(url, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "queue_full"
    assert _engine_idle(app).kv_blocks_used == 0
    ok = _post(url, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None)
    assert ok.status_code == 200


def _fail_next_step(app) -> None:
    app.state.bridge.call_threadsafe(lambda e: setattr(e, "fail_next_step", True)).result(10)


def test_engine_failure_mid_stream_sends_an_error_event_and_logs_the_request_id(slow_server,
                                                                              caplog):
    url, app = slow_server
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 50, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        _fail_next_step(app)
        rest = [line for line in lines if line]
    rid = r.headers["x-request-id"]
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][6:])["error"]
    assert err["code"] == "internal_error" and rid in err["message"]
    assert any(rid in rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR")
    assert _engine_idle(app).kv_blocks_used == 0
    assert httpx.get(url + "/health").status_code == 200  # the engine serves on


def test_engine_failure_on_a_non_streamed_request_is_a_500_naming_the_request(slow_server):
    url, app = slow_server
    _fail_next_step(app)
    r = _post(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5})
    assert r.status_code == 500
    assert r.headers["x-request-id"] in r.json()["error"]["message"]
    assert _post(url, "/v1/completions", {"model": MODEL, "prompt": "x"}).status_code == 200
