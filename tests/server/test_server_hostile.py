"""Requests an attacker or a careless client sends, against a real uvicorn on 127.0.0.1: each
gets a clear 4xx naming the field (never a 500), and none can stall or disable the server."""

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_server import MODEL, PROMPT, make_engine_and_tokenizer
from test_server_bridge import FakeEngine
from test_server_units import ByteTokenizer

from grok1.server.app import create_app
from grok1.server.cli_serve import serve_in_thread

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    engine, tokenizer = make_engine_and_tokenizer(max_batch_size=8)
    app = create_app(engine, tokenizer, MODEL)
    with serve_in_thread(app) as url:
        yield url, app


def _post(url: str, body, path: str = "/v1/completions", headers=JSON, timeout: float = 30):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers=headers, timeout=timeout)


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_a_huge_top_k_is_a_400_and_the_server_stays_healthy(server):
    url, _ = server
    err = _error(_post(url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                             "top_k": 100000000000000000000}))
    assert err["param"] == "top_k" and "2147483647" in err["message"]
    # the largest top_k admitted (beyond the vocabulary: keeps every token) samples fine
    ok = _post(url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "top_k": 2**31 - 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("field,value,param,message", [
    ("n", "2", "n", "valid integer"),
    ("stream", "yes", "stream", "valid boolean"),
    ("prompt", [True, False], "prompt.0", "valid integer"),
    ("max_tokens", 2.0, "max_tokens", "valid integer"),
    ("seed", 2**64, "seed", "less than or equal to"),
    ("stop", ["x" * 300], "stop.0", "at most 256"),
    ("prompt", {"text": "x"}, "prompt", "expected a string, a list of strings"),
])
def test_loosely_typed_or_unbounded_values_get_400_naming_the_field(server, field, value, param,
                                                                    message):
    url, _ = server
    err = _error(_post(url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, field: value}))
    assert err["param"] == param and message in err["message"]
    assert err["message"].startswith(f"{param}: ")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(server, constant):
    url, _ = server
    body = f'{{"model": "{MODEL}", "prompt": "x", "temperature": {constant}}}'
    err = _error(_post(url, body))
    assert err["code"] == "invalid_json" and f"{constant} is not JSON" in err["message"]


def test_a_lone_surrogate_in_a_prompt_or_chat_content_is_a_400(server):
    url, _ = server
    err = _error(_post(url, {"model": MODEL, "prompt": "ab\ud800cd", "max_tokens": 2}))
    assert err["param"] == "prompt" and "lone surrogate U+D800 at character 2" in err["message"]
    chat = {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "x\udfff"}]}]}
    err = _error(_post(url, chat, "/v1/chat/completions"))
    assert err["param"] == "messages.1.content.0.text" and "U+DFFF" in err["message"]
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_a_body_not_declared_json_is_a_415(server, content_type):
    url, _ = server
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1})
    err = _error(_post(url, body, headers=headers), 415)
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    ok = _post(url, body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_wrong_method_gets_405_with_allow(server):
    url, _ = server
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert httpx.delete(url + "/health").headers["allow"] == "GET"


def test_tiny_temperature_gives_the_greedy_tokens_not_pad(server):
    url, _ = server
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "ignore_eos": True}
    greedy = _post(url, {**body, "temperature": 0}).json()["choices"][0]["text"]
    tiny = _post(url, {**body, "temperature": 1e-39}).json()["choices"][0]["text"]
    assert tiny == greedy and greedy.strip("\x00") != ""


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(server):
    url, app = server
    serving_limit = 32 * app.state.bridge.engine.max_model_len
    t0 = time.monotonic()
    err = _error(_post(url, {"model": MODEL, "prompt": "a" * (3_900_000), "max_tokens": 1}))
    assert time.monotonic() - t0 < 1.0
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert f"3900000 characters; this server takes at most {serving_limit}" in err["message"]


class SlowTokenizer(ByteTokenizer):
    """Encoding holds its thread for a while, as a multi-megabyte prompt does."""

    def encode(self, text: str) -> list[int]:
        time.sleep(1.0)
        return super().encode(text)


def test_tokenizing_runs_off_the_event_loop_so_health_and_streams_go_on():
    app = create_app(FakeEngine(step_delay_s=0.01), SlowTokenizer(), MODEL)
    with serve_in_thread(app) as url:
        slow = threading.Thread(target=_post, args=(url, {"model": MODEL, "prompt": "x",
                                                          "max_tokens": 2}))
        slow.start()
        time.sleep(0.2)  # the slow request is tokenizing now
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        health_s = time.monotonic() - t0
        slow.join()
    assert health_s < 0.5  # on the loop it would wait out the 1 s encode
