"""Clients that leave, clients that never read, and shutdown with streams in flight, against a
real uvicorn on 127.0.0.1 over the scripted engine (FakeEngine: steps as fast as asked)."""

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_server import MODEL, PROMPT
from test_server_bridge import FakeEngine
from test_server_units import ByteTokenizer

from grok1.server.app import create_app
from grok1.server.cli_serve import serve_in_thread


class WideTokenizer(ByteTokenizer):
    """Every generated token decodes to 2,000 characters: streams fill socket buffers fast."""

    def decode(self, ids: list[int]) -> str:
        return "".join("x" * 2000 if t >= 3 else "" for t in ids)


def _metric(app, name: str, **labels) -> float:
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def _wait_until(condition, timeout_s: float) -> float:
    """Seconds until condition() held; AssertionError past timeout_s."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def _stream_without_reading(url: str, max_tokens: int) -> socket.socket:
    """A client that sends a streamed request and then never reads (a small receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_a_non_streamed_client_that_leaves_is_counted_as_a_client_abort_not_a_500(caplog):
    app = create_app(FakeEngine(step_delay_s=0.01), ByteTokenizer(), MODEL)
    with serve_in_thread(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                      "max_tokens": 90}, timeout=0.2)
        _wait_until(lambda: _metric(app, "grok1_client_aborts_total", reason="disconnected"),
                    5)
        assert app.state.bridge.num_pending == 0
        requests = {status: _metric(app, "grok1_http_requests_total",
                                    endpoint="/v1/completions", status=status)
                    for status in ("499", "500")}
    assert requests == {"499": 1.0, "500": 0.0}
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


@pytest.mark.parametrize("limit, reason", [("buffer", "buffer_full"), ("timeout",
                                                                        "write_timeout")])
def test_a_client_that_stops_reading_is_aborted_and_frees_its_slots(limit, reason):
    engine = FakeEngine(step_delay_s=0.001, max_model_len=200_000)
    app = create_app(engine, WideTokenizer(), MODEL, max_pending=2,
                     max_buffered_outputs=32 if limit == "buffer" else 10**6,
                     write_timeout_s=0.5 if limit == "timeout" else 600)
    with serve_in_thread(app) as url:
        stalled = [_stream_without_reading(url, 100_000) for _ in range(2)]
        try:
            _wait_until(lambda: app.state.bridge.num_pending == 2, 5)
            _wait_until(lambda: app.state.bridge.num_pending == 0, 20)
            assert _metric(app, "grok1_client_aborts_total", reason=reason) == 2
            # the engine requests were aborted too: the abort reaches the engine thread after
            # the event loop released the slots, so under load it may take a moment
            _wait_until(lambda: engine.stats().num_running == 0, 5)
            ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x",
                                                           "max_tokens": 2}, timeout=10)
            assert ok.status_code == 200  # the slots are free again
        finally:
            for sock in stalled:
                sock.close()


def test_shutdown_timeout_ends_in_flight_streams_with_an_error_event_and_done_within_it():
    shutdown_timeout_s = 0.5
    app = create_app(FakeEngine(step_delay_s=0.05), ByteTokenizer(), MODEL)  # 100 tokens: 5 s
    first_chunk, events, ended = threading.Event(), [], []

    def client(url: str) -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    first_chunk.set()
        ended.append(time.monotonic())

    with serve_in_thread(app, shutdown_timeout_s=shutdown_timeout_s) as url:
        reader = threading.Thread(target=client, args=(url,))
        reader.start()
        assert first_chunk.wait(10)
        t_stop = time.monotonic()  # leaving the block stops the server, as SIGTERM does
    reader.join(10)
    assert ended and ended[0] - t_stop < shutdown_timeout_s + 1.0  # before: the 5 s stream ran out
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "unavailable" and "shut down" in error["message"]
