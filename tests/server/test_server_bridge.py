"""EngineBridge against a scripted fake engine: the failure paths a real model cannot be made to
take on demand (a step that raises, a full queue, shutdown with requests in flight)."""

import asyncio
import collections
import math
import random
import threading
import time
import types

import pytest

pytest.importorskip("fastapi")

from grok1.engine.llm import (
    EngineStats,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    WarmupReport,
)
from grok1.server.bridge import (
    EngineBridge,
    EngineStepError,
    EngineUnavailableError,
    QueueFullError,
    RequestRejectedError,
    SubRequest,
)


class FakeEngine:
    """The Engine contract over a toy model: greedy picks a letter from the sequence's sum,
    sampling draws letters from a per-request seeded RNG. Blocks are counted like a paged cache.

    `compile_s` models the GPU engine's lazy first use of a shape (a Triton compile or a CUDA
    graph capture per decode batch bucket): the first step at each bucket takes that much
    longer, unless `warmup()` paid for all of them before serving. `batch_sizes` logs the
    number of requests in each step."""

    BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)  # grok1.engine.runner.GRAPH_BUCKETS

    def __init__(self, *, vocab_size=256, max_batch_size=4, block_size=4, num_blocks=64,
                 max_model_len=128, step_delay_s=0.0, compile_s=0.0):
        self.config = types.SimpleNamespace(vocab_size=vocab_size, eos_token=2)
        self.max_model_len = max_model_len
        self.max_batch_size, self.block_size, self.num_blocks = max_batch_size, block_size, num_blocks
        self.step_delay_s = step_delay_s
        self.compile_s = compile_s
        self.compiled: set[int] = set()
        self.batch_sizes: list[int] = []
        self.fail_next_step = False
        self.fail_aborts = False
        self.thread_ids: set[int] = set()
        self.waiting: collections.deque = collections.deque()
        self.running: dict = {}
        self.reqs: dict = {}
        self.aborted: list = []  # reported by the next step, as the real engine does

    def _touch(self):
        self.thread_ids.add(threading.get_ident())

    def add_request(self, request_id, prompt_token_ids, params):
        self._touch()
        if not prompt_token_ids:
            raise ValueError("empty prompt")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError("too long")
        if request_id in self.reqs:
            raise ValueError(f"duplicate request id {request_id}")
        rng = random.Random(params.seed if params.seed is not None else random.random())
        self.reqs[request_id] = {"ids": list(prompt_token_ids), "n_prompt": len(prompt_token_ids),
                                     "params": params, "rng": rng, "blocks": 0}
        self.waiting.append(request_id)

    def abort_request(self, request_id):
        self._touch()
        if self.fail_aborts:
            raise RuntimeError("injected abort failure")
        if request_id in self.reqs:
            self.waiting = collections.deque(r for r in self.waiting if r != request_id)
            self.running.pop(request_id, None)
            r = self.reqs.pop(request_id)
            self.aborted.append(RequestOutput(request_id, [], None, True, "abort", r["n_prompt"],
                                              len(r["ids"]) - r["n_prompt"]))

    def _blocks_used(self):
        return sum(r["blocks"] for r in self.reqs.values())

    def warmup(self, prefill_sizes=None):
        self._touch()
        time.sleep(self.compile_s)  # every bucket at once: the cost moves to start-up
        self.compiled.update(self.BUCKETS)
        return WarmupReport(forwards=0, graphs=len(self.BUCKETS), seconds=self.compile_s)

    def step(self):
        self._touch()
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected step failure")
        outputs, self.aborted = self.aborted, []
        while self.waiting and len(self.running) < self.max_batch_size:
            rid = self.waiting.popleft()
            self.running[rid] = True
        bucket = next((b for b in self.BUCKETS if b >= len(self.running)), len(self.running))
        if self.running and bucket not in self.compiled:
            self.compiled.add(bucket)
            time.sleep(self.compile_s)
        time.sleep(self.step_delay_s)
        if self.running:
            self.batch_sizes.append(len(self.running))
        for rid in list(self.running):
            r = self.reqs[rid]
            p = r["params"]
            if p.temperature == 0:
                tok = 3 + ord("a") + sum(r["ids"]) % 26
            else:
                tok = 3 + ord(r["rng"].choice("abcdefgh "))
            r["ids"].append(tok)
            r["blocks"] = math.ceil(len(r["ids"]) / self.block_size)
            n_gen = len(r["ids"]) - r["n_prompt"]
            lp = None
            if p.logprobs is not None:
                lp = [TokenLogprob(tok, -0.5, [(tok, -0.5), (tok + 1, -1.5)][:p.logprobs])]
            done = n_gen >= p.max_tokens
            outputs.append(RequestOutput(rid, [tok], lp, done, "length" if done else None,
                                         r["n_prompt"], n_gen))
            if done:
                del self.running[rid], self.reqs[rid]
        return outputs

    def has_unfinished_requests(self):
        return bool(self.reqs) or bool(self.aborted)

    def stats(self):
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           kv_blocks_used=self._blocks_used(), kv_blocks_total=self.num_blocks,
                           num_preempted_total=0)


def _sub(rid, n_tokens=4, seed=1):
    return SubRequest(rid, [10, 11, 12], SamplingParams(max_tokens=n_tokens, temperature=1.0,
                                                        seed=seed))


async def _collect(group):
    out = collections.defaultdict(list)
    try:
        async for o in group.outputs():
            out[o.request_id] += o.new_token_ids
    finally:
        group.close()
    return dict(out)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_group_outputs_arrive_and_engine_runs_on_one_thread():
    async def main():
        engine = FakeEngine()
        bridge = EngineBridge(engine, max_pending=8)
        await bridge.start()
        group = await bridge.submit([_sub("a", 5, seed=3), _sub("b", 3, seed=3)])
        got = await _collect(group)
        stats = await bridge.call(lambda e: e.stats())
        await bridge.shutdown(grace_s=1)
        return engine, got, stats

    engine, got, stats = _run(main())
    assert len(got["a"]) == 5 and len(got["b"]) == 3
    assert got["a"][:3] == got["b"]  # same seed, same draws
    assert len(engine.thread_ids) == 1 and threading.get_ident() not in engine.thread_ids
    assert stats.kv_blocks_used == 0 and stats.num_running == 0


def test_closing_a_group_early_aborts_its_requests_and_frees_blocks():
    async def main():
        engine = FakeEngine(step_delay_s=0.01)
        bridge = EngineBridge(engine, max_pending=8)
        await bridge.start()
        group = await bridge.submit([_sub("a", 100)])
        async for _ in group.outputs():
            break  # the client went away after one token
        group.close()
        await asyncio.sleep(0.1)
        stats = await bridge.call(lambda e: e.stats())
        pending = bridge.num_pending
        await bridge.shutdown(grace_s=1)
        return stats, pending

    stats, pending = _run(main())
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting, pending) == (0, 0, 0, 0)


def test_full_queue_raises_queue_full_and_admits_again_after_release():
    async def main():
        bridge = EngineBridge(FakeEngine(step_delay_s=0.01), max_pending=2)
        await bridge.start()
        first = await bridge.submit([_sub("a", 50), _sub("b", 50)])
        with pytest.raises(QueueFullError):
            await bridge.submit([_sub("c")])
        first.close()
        second = await bridge.submit([_sub("c", 2)])
        got = await _collect(second)
        await bridge.shutdown(grace_s=1)
        return got

    assert len(_run(main())["c"]) == 2


def test_engine_add_error_reaches_the_caller_and_leaves_nothing_behind():
    async def main():
        engine = FakeEngine()
        bridge = EngineBridge(engine, max_pending=8)
        await bridge.start()
        bad = SubRequest("bad", [], SamplingParams(max_tokens=2))
        with pytest.raises(RequestRejectedError, match="empty prompt"):
            await bridge.submit([_sub("ok"), bad])
        stats = await bridge.call(lambda e: e.stats())
        await bridge.shutdown(grace_s=1)
        return stats, bridge.num_pending

    stats, pending = _run(main())
    assert (stats.num_waiting + stats.num_running, stats.kv_blocks_used, pending) == (0, 0, 0)


def test_failed_step_fails_in_flight_requests_and_the_engine_keeps_serving():
    async def main():
        engine = FakeEngine(step_delay_s=0.01)
        bridge = EngineBridge(engine, max_pending=8)
        await bridge.start()
        group = await bridge.submit([_sub("a", 50)])
        await bridge.call(lambda e: setattr(e, "fail_next_step", True))
        with pytest.raises(EngineStepError, match="injected"):
            await _collect(group)
        after = await _collect(await bridge.submit([_sub("b", 3)]))
        healthy = bridge.healthy
        await bridge.shutdown(grace_s=1)
        return after, healthy

    after, healthy = _run(main())
    assert len(after["b"]) == 3 and healthy


def test_engine_thread_death_fails_in_flight_requests_and_reports_unhealthy():
    async def main():
        engine = FakeEngine(step_delay_s=0.01)
        bridge = EngineBridge(engine, max_pending=8)
        await bridge.start()
        group = await bridge.submit([_sub("a", 50)])

        def break_engine(e):
            e.fail_next_step = e.fail_aborts = True
        await bridge.call(break_engine)
        with pytest.raises(EngineUnavailableError, match="engine thread died"):
            await _collect(group)
        with pytest.raises(EngineUnavailableError):
            await bridge.submit([_sub("b")])
        healthy = bridge.healthy
        await bridge.shutdown(grace_s=0.1)
        return healthy

    assert _run(main()) is False


def test_shutdown_cancels_requests_still_running_after_the_grace_period():
    async def main():
        engine = FakeEngine(step_delay_s=0.01)
        bridge = EngineBridge(engine, max_pending=8)
        await bridge.start()
        group = await bridge.submit([_sub("a", 10_000 // 100)])
        collector = asyncio.ensure_future(_collect(group))
        await asyncio.sleep(0.05)
        await bridge.shutdown(grace_s=0.05)
        with pytest.raises(EngineUnavailableError):
            await collector
        with pytest.raises(EngineUnavailableError):
            await bridge.submit([_sub("late")])
        return engine

    engine = _run(main())
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished_requests()


def test_shutdown_lets_short_requests_finish_within_the_grace_period():
    async def main():
        bridge = EngineBridge(FakeEngine(step_delay_s=0.005), max_pending=8)
        await bridge.start()
        group = await bridge.submit([_sub("a", 5)])
        collector = asyncio.ensure_future(_collect(group))
        await bridge.shutdown(grace_s=5)
        return await collector

    assert len(_run(main())["a"]) == 5
