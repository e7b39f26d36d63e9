"""A failing engine step with the real Engine (tiny model, CPU): the request whose data broke it
fails alone, a failed forward cancels what was in flight and the engine serves on, and a broken
engine makes /health say why and `grok1 serve` exit non-zero."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _processes import free_port, wait_until_healthy
from test_server_bridge import _collect, _run

import grok1.engine.llm as llm
from grok1 import random_weights
from grok1.engine.llm import Engine, SamplingParams
from grok1.server.bridge import (
    EngineBridge,
    EngineStepError,
    EngineUnavailableError,
    RequestFailedError,
    SubRequest,
)

REPO = Path(__file__).resolve().parents[2]
POISON_SEED = 666  # the injected sampler failure hits rows with this seed only


def real_engine() -> Engine:
    model = random_weights("tiny", quantized=False)
    return Engine(model, max_batch_size=8, use_cuda_graphs=False)


def _sub(rid: str, n_tokens: int, seed: int = 1) -> SubRequest:
    return SubRequest(rid, [10, 11, 12, 13], SamplingParams(max_tokens=n_tokens, temperature=1.0,
                                                            seed=seed, ignore_eos=True))


def test_a_request_whose_sampling_fails_fails_alone_and_the_batch_goes_on(monkeypatch):
    real_sample_rows = llm.sample_rows

    def sample_rows(logits, params, generators):
        if any(p.seed == POISON_SEED for p in params):
            raise OverflowError("injected: this seed breaks the sampler")
        return real_sample_rows(logits, params, generators)

    monkeypatch.setattr(llm, "sample_rows", sample_rows)

    async def main():
        bridge = EngineBridge(real_engine(), max_pending=8)
        await bridge.start()
        good = await bridge.submit([_sub("good", 12)])
        bad = await bridge.submit([_sub("bad", 12, seed=POISON_SEED)])
        good_tokens = asyncio.ensure_future(_collect(good))
        with pytest.raises(RequestFailedError, match="bad: sampling failed: OverflowError: "
                                                     "injected"):
            await _collect(bad)
        got = await good_tokens
        after = await _collect(await bridge.submit([_sub("after", 3)]))
        healthy, failures = bridge.healthy, bridge.metrics.step_failures._value.get()
        stats = await bridge.call(lambda e: e.stats())
        await bridge.shutdown(grace_s=1)
        return got, after, healthy, failures, stats

    got, after, healthy, failures, stats = _run(main())
    assert len(got["good"]) == 12 and len(after["after"]) == 3
    assert healthy and failures == 0  # the step itself did not fail
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)


def test_a_failing_forward_cancels_the_requests_in_flight_and_the_engine_serves_on():
    engine = real_engine()
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def execute_failing_once(chunks):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected: one forward fails")
        return real_execute(chunks)

    engine.runner.execute = execute_failing_once

    async def main():
        bridge = EngineBridge(engine, max_pending=8)
        await bridge.start()
        a = await bridge.submit([_sub("a", 20), _sub("b", 20, seed=2)])
        with pytest.raises(EngineStepError, match="injected: one forward fails"):
            await _collect(a)
        after = await _collect(await bridge.submit([_sub("after", 4)]))
        healthy, failures = bridge.healthy, bridge.metrics.step_failures._value.get()
        stats = await bridge.call(lambda e: e.stats())
        await bridge.shutdown(grace_s=1)
        return after, healthy, failures, stats

    after, healthy, failures, stats = _run(main())
    assert len(after["after"]) == 4 and healthy and failures == 1
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)


def test_a_broken_engine_fails_its_requests_reports_why_and_calls_on_fatal():
    engine = real_engine()

    def execute_broken(chunks):
        raise RuntimeError("injected: the device is gone")

    engine.runner.execute = execute_broken
    fatal: list[str] = []

    async def main():
        bridge = EngineBridge(engine, max_pending=8, on_fatal=fatal.append)
        await bridge.start()
        group = await bridge.submit([_sub("a", 5)])
        with pytest.raises(EngineUnavailableError, match="no longer works"):
            await _collect(group)
        await asyncio.sleep(0.05)  # on_fatal runs on the loop right after the failure
        with pytest.raises(EngineUnavailableError, match="the device is gone"):
            await bridge.submit([_sub("b", 2)])
        healthy, reason = bridge.healthy, bridge.dead_reason
        await bridge.shutdown(grace_s=0.1)
        return healthy, reason

    healthy, reason = _run(main())
    assert not healthy and "injected: the device is gone" in reason
    assert fatal == [reason]


BROKEN_SERVE = """
import sys
from grok1.engine.runner import ModelRunner

def execute(self, chunks):
    raise RuntimeError("injected: the device is gone")

ModelRunner.execute = execute  # the CPU warm-up runs no forward: the first request breaks it
from grok1.server.cli_serve import main
main(sys.argv[1:])
"""


def test_serve_process_with_a_broken_engine_says_why_on_health_then_exits_non_zero():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GROK1_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-c", BROKEN_SERVE, "--port", str(port), "--device",
                             "cpu", "--max-batch-size", "4", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(url, proc)
        r = httpx.post(url + "/v1/completions", json={"model": "grok1-default", "prompt": "Hi",
                                                      "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "no longer works" in r.json()["error"]["message"]
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "injected: the device is gone" in health.json()["reason"]
        t0 = time.monotonic()
        assert proc.wait(timeout=30) == 1
        assert time.monotonic() - t0 < 10
        assert "exiting with status 1" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
