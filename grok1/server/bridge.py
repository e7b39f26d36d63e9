"""The single-threaded Engine behind asyncio: one engine thread, one output queue per HTTP request.

The Engine is not thread-safe, so only the engine thread touches it. Request handlers (on the
event loop) submit a group of engine requests (n choices x prompts) and read its outputs from an
asyncio queue; adds, aborts and calls travel to the engine thread through a command queue that
it drains between steps. Closing a group aborts whatever of it is unfinished, which frees its
cache blocks at the engine's next command drain (within one step): handlers close their group in
`finally`, so a client that disconnects mid-stream cancels its requests.

Start-up warms the engine before admitting anything (`Engine.warmup`): on a GPU the first step of
each new shape would otherwise compile Triton kernels or capture a CUDA graph while every request
in flight waits, which under load showed as multi-second time-to-first-token tails.

A step that raises: the engine fails by itself the requests whose own sampling broke
(finish_reason "error", `RequestFailedError` here); any other exception out of `step()` cancels
every request in flight (the engine cannot say whose data it was), after which the bridge checks
that the engine still works (drain the aborts, one one-token forward). If it does not, or the
thread fails otherwise, the engine is broken: the bridge reports unhealthy with the reason
(`dead_reason`, shown by /health) and calls `on_fatal`, through which `grok1 serve` exits
non-zero so that a supervisor restarts it. Nothing else can fix a broken engine in-process.

Back-pressure: at most `max_pending` engine requests are admitted (running + waiting); past that
`submit` raises `QueueFullError` (the server answers 503 with Retry-After) instead of queueing
without bound. A group whose reader falls behind by more than `max_buffered_outputs` engine
outputs (a client that stops reading its stream) is aborted and its slots freed at once
(`ClientTooSlowError`), rather than when its socket finally closes.

Shutdown stops admissions, lets in-flight requests finish for a grace period, then cancels the
rest (streams end with an error event) and stops the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from grok1.engine.llm import Engine, EngineStats, RequestOutput, SamplingParams

log = logging.getLogger("grok1.server")

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                      0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class QueueFullError(RuntimeError):
    """More engine requests than the server admits; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ClientTooSlowError(RuntimeError):
    """The client read its stream too slowly; its engine requests were aborted."""


class RequestRejectedError(ValueError):
    """engine.add_request refused the request (its ValueError's message): a client error."""


class EngineUnavailableError(RuntimeError):
    """The server is shutting down, or the engine thread died."""


class EngineStepError(RuntimeError):
    """engine.step() raised; the requests in flight at that moment were cancelled."""


class RequestFailedError(RuntimeError):
    """The engine failed this request alone (finish_reason "error"); the others went on."""


@dataclasses.dataclass(frozen=True)
class SubRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: int = 0  # the served LoRA adapter the request names (Engine.add_request; 0: none)


class ServerMetrics:
    """Prometheus metrics of one server, in its own registry (tests run several servers)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("grok1_http_requests", "HTTP requests answered, by endpoint "
                                "and status code", ["endpoint", "status"], registry=r)
        self.finished = Counter("grok1_engine_requests_finished", "Engine requests finished, by "
                                "reason (stop, length, abort)", ["reason"], registry=r)
        self.prompt_tokens = Counter("grok1_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("grok1_generation_tokens", "Tokens generated (rate() "
                                         "of this is tokens/s)", registry=r)
        self.ttft = Histogram("grok1_time_to_first_token_seconds", "Submit to first generated "
                              "token", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("grok1_inter_token_latency_seconds", "Time between successive "
                             "tokens of one request", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("grok1_request_latency_seconds", "Submit to last token",
                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.running = Gauge("grok1_num_requests_running", "Engine requests in the batch",
                             registry=r)
        self.waiting = Gauge("grok1_num_requests_waiting", "Engine requests queued for the batch",
                             registry=r)
        self.pending = Gauge("grok1_num_requests_admitted", "Engine requests admitted by the "
                             "server and not yet closed (bounded by max_pending)", registry=r)
        self.kv_used = Gauge("grok1_kv_cache_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_total = Gauge("grok1_kv_cache_blocks_total", "KV-cache blocks", registry=r)
        self.kv_usage = Gauge("grok1_kv_cache_usage_ratio", "KV-cache blocks used / total",
                              registry=r)
        self.client_aborts = Counter("grok1_client_aborts", "Requests ended because the client "
                                     "left (disconnected) or read too slowly (write_timeout, "
                                     "buffer_full)", ["reason"], registry=r)
        self.step_failures = Counter("grok1_engine_step_failures", "Engine steps that raised "
                                     "(the requests in flight were cancelled; the engine was "
                                     "checked and served on)", registry=r)
        self.preempted = Gauge("grok1_num_preempted", "Engine preemptions since start",
                               registry=r)
        self.rejected = Counter("grok1_requests_rejected_queue_full", "Requests answered 503 "
                                "because the queue was full", registry=r)
        self.warmup_seconds = Gauge("grok1_engine_warmup_seconds", "Time the engine's warm-up "
                                    "(kernel compiles, CUDA graphs) took before serving",
                                    registry=r)

    def observe_stats(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_used.set(s.kv_blocks_used)
        self.kv_total.set(s.kv_blocks_total)
        self.kv_usage.set(s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        self.preempted.set(s.num_preempted_total)


class RequestGroup:
    """The engine requests of one HTTP request. Iterate `outputs()`; always `close()` it."""

    def __init__(self, bridge: EngineBridge, request_ids: list[str]):
        self._bridge = bridge
        self.request_ids = request_ids
        self._unfinished = set(request_ids)
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._t_submit = time.monotonic()
        self._t_last: dict[str, float] = {}
        self._closed = False
        self._failure: BaseException | None = None  # why the group was closed for its reader

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Engine outputs of this group's unfinished requests, in arrival order; raises
        RequestFailedError if the engine failed one of them, or the bridge's error if the
        engine failed or the server shut down meanwhile."""
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.request_id not in self._unfinished:
                continue  # stopped early by the server (stop string); the engine had one more
            if item.finished:
                self._unfinished.discard(item.request_id)
            if item.finish_reason == "error":  # this request alone failed; the others go on
                raise RequestFailedError(f"engine failed {item.request_id}: {item.error}")
            yield item
        if self._failure is not None:
            raise self._failure

    def finish(self, request_id: str) -> None:
        """Stop one request early (a stop string matched): abort it in the engine."""
        if request_id in self._unfinished:
            self._unfinished.discard(request_id)
            self._bridge._abort([request_id], reason="stop")

    def close(self) -> None:
        """Abort what is unfinished and release the group's admission slots (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._unfinished:
            self._bridge._abort(sorted(self._unfinished))
            self._unfinished.clear()
        self._bridge._release(self)

    def _put(self, out: RequestOutput, t: float) -> None:
        m = self._bridge.metrics
        if out.request_id in self._unfinished:  # not one the server already stopped
            if out.new_token_ids:
                last = self._t_last.get(out.request_id)
                if last is None:
                    m.ttft.observe(t - self._t_submit)
                else:
                    for _ in out.new_token_ids:
                        m.itl.observe((t - last) / len(out.new_token_ids))
                self._t_last[out.request_id] = t
            if out.finished:
                m.e2e.observe(t - self._t_submit)
        self._queue.put_nowait(out)
        limit = self._bridge.max_buffered_outputs
        if self._queue.qsize() > limit and not self._closed:
            self._failure = ClientTooSlowError(
                f"the client read too slowly: more than {limit} engine outputs were waiting to "
                "be sent; request aborted")
            m.client_aborts.labels("buffer_full").inc()
            self.close()


class EngineBridge:
    """Owns the engine thread. Create, `await start()` on the serving loop, `await shutdown()`."""

    def __init__(self, engine: Engine, *, max_pending: int, metrics: ServerMetrics | None = None,
                 on_fatal: Callable[[str], None] | None = None, max_buffered_outputs: int = 1024):
        """on_fatal(reason) is called on the event loop once the engine is broken.
        max_buffered_outputs: engine outputs a group may hold unread before it is aborted."""
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending}: must be >= 1")
        if max_buffered_outputs < 1:
            raise ValueError(f"max_buffered_outputs={max_buffered_outputs}: must be >= 1")
        self.engine = engine
        self.max_pending = max_pending
        self.max_buffered_outputs = max_buffered_outputs
        self.metrics = metrics or ServerMetrics()
        self._commands: queue.SimpleQueue[tuple[str, Any, concurrent.futures.Future | None]] = \
            queue.SimpleQueue()
        self._groups: dict[str, RequestGroup] = {}  # request id -> group (event loop only)
        self._num_pending = 0  # admitted engine requests (event loop only)
        self._live: set[str] = set()  # added, not finished or aborted (engine thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._dead_reason: str | None = None
        self._shutting_down: asyncio.Future | None = None
        self.on_fatal = on_fatal
        self.last_stats: EngineStats | None = None

    # ---- event-loop side -------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread and warm the engine up on it (`Engine.warmup`: on a GPU,
        Triton compiles and CUDA-graph captures that would otherwise stall the first requests
        of each shape for seconds); returns once it is ready to serve. A failed warm-up raises
        here, so the server never reports healthy."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="grok1-engine", daemon=True)
        self._thread.start()
        try:
            report = await self.call(lambda engine: engine.warmup())
        except BaseException:
            self._send("stop", None, None)
            raise
        self.metrics.warmup_seconds.set(report.seconds)
        log.info("engine warm-up: %d eager forwards, %d CUDA graphs in %.1f s",
                 report.forwards, report.graphs, report.seconds)
        self._accepting = True

    @property
    def healthy(self) -> bool:
        return (self._accepting and self._dead_reason is None and self._thread is not None
                and self._thread.is_alive())

    @property
    def dead_reason(self) -> str | None:
        """Why the engine is broken (None while it is not)."""
        return self._dead_reason

    @property
    def num_pending(self) -> int:
        return self._num_pending

    async def submit(self, subs: list[SubRequest]) -> RequestGroup:
        """Admit engine requests and wait until the engine thread has added them.
        Raises QueueFullError, EngineUnavailableError, or RequestRejectedError (the engine's
        ValueError from add_request)."""
        if not self.healthy:
            raise EngineUnavailableError(self._dead_reason or "server is shutting down")
        if self._num_pending + len(subs) > self.max_pending:
            self.metrics.rejected.inc()
            raise QueueFullError(f"server busy: {self._num_pending} requests admitted, "
                                 f"limit {self.max_pending}; retry shortly")
        group = RequestGroup(self, [s.request_id for s in subs])
        for s in subs:
            self._groups[s.request_id] = group
        self._num_pending += len(subs)
        self.metrics.pending.set(self._num_pending)
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._send("add", subs, added)
        try:
            await self._engine_result(added)
        except BaseException:  # ValueError from the engine, or the client went away meanwhile
            group.close()
            raise
        return group

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread (between steps) and return its result."""
        return await self._engine_result(self.call_threadsafe(fn))

    async def _engine_result(self, fut: concurrent.futures.Future) -> Any:
        """The future's result; EngineUnavailableError if the engine thread is gone first."""
        wrapped = asyncio.wrap_future(fut)
        while True:
            done, _ = await asyncio.wait({wrapped}, timeout=1.0)
            if done:
                return wrapped.result()
            if self._thread is None or not self._thread.is_alive():
                wrapped.cancel()
                raise EngineUnavailableError(self._dead_reason or "engine thread stopped")

    def call_threadsafe(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send("call", fn, fut)
        return fut

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to grace_s, cancel the rest
        (their handlers get EngineUnavailableError), and stop the engine thread. Later calls
        wait for the first one's shutdown (grok1 serve starts it as uvicorn begins to drain,
        and the app's lifespan calls it again)."""
        if self._shutting_down is None:
            self._shutting_down = asyncio.ensure_future(self._shut_down(grace_s))
        await asyncio.shield(self._shutting_down)

    async def _shut_down(self, grace_s: float) -> None:
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        cancelled = set(self._groups.values())
        for group in cancelled:
            group._queue.put_nowait(EngineUnavailableError("server shut down before the "
                                                           "request finished"))
        if cancelled:
            log.warning("shutdown: cancelled %d unfinished request group(s)", len(cancelled))
        self._send("stop", None, None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 60.0)

    def _send(self, kind: str, payload: Any, fut: concurrent.futures.Future | None) -> None:
        self._commands.put((kind, payload, fut))

    def _abort(self, request_ids: list[str], reason: str = "abort") -> None:
        self._send("abort", (request_ids, reason), None)

    def _release(self, group: RequestGroup) -> None:
        for rid in group.request_ids:
            if self._groups.pop(rid, None) is not None:
                self._num_pending -= 1
        self.metrics.pending.set(self._num_pending)

    def _deliver(self, outputs: list[RequestOutput], t: float) -> None:
        for out in outputs:
            group = self._groups.get(out.request_id)
            if group is not None:
                group._put(out, t)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for group in {self._groups[r] for r in request_ids if r in self._groups}:
            group._queue.put_nowait(error)

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                if not self._handle_commands(block=not busy):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
        except Exception as e:  # the engine is broken (or this loop has a bug): nothing to save
            log.exception("engine thread died")
            self._dead_reason = f"engine thread died: {type(e).__name__}: {e}"
            self._loop.call_soon_threadsafe(self._die, sorted(self._live))

    def _die(self, request_ids: list[str]) -> None:
        """Event loop: fail what was in flight, then tell the owner (grok1 serve exits)."""
        self._fail(request_ids, EngineUnavailableError(self._dead_reason))
        if self.on_fatal is not None:
            self.on_fatal(self._dead_reason)

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if `block`); False once told to stop."""
        try:
            first = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        commands = [first]
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for kind, payload, fut in commands:
            if kind == "add":
                self._add(payload, fut)
            elif kind == "abort":  # reason "stop": the server matched a stop string
                request_ids, reason = payload
                for rid in request_ids:
                    if rid in self._live:
                        self._live.discard(rid)
                        self.engine.abort_request(rid)
                        self.metrics.finished.labels(reason).inc()
            elif kind == "call":
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(payload(self.engine))
                    except Exception as e:  # noqa: BLE001 - the caller gets it
                        fut.set_exception(e)
            elif kind == "stop":
                for rid in sorted(self._live):
                    self.engine.abort_request(rid)
                self._live.clear()
                if self.engine.has_unfinished_requests():
                    self.engine.step()  # reports the aborts: the engine is left empty
                self._publish_stats()
                return False
        return True

    def _add(self, subs: list[SubRequest], fut: concurrent.futures.Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return  # the client left before we got here
        added: list[str] = []
        try:
            for s in subs:
                # engines without adapters (the ranks' leader, test fakes) take no `adapter`
                extra = {"adapter": s.adapter} if s.adapter else {}
                self.engine.add_request(s.request_id, s.prompt_ids, s.params, **extra)
                added.append(s.request_id)
                self._live.add(s.request_id)
        except Exception as e:  # noqa: BLE001 - ValueError: bad request; else our bug (500)
            for rid in added:
                self.engine.abort_request(rid)
                self._live.discard(rid)
            fut.set_exception(RequestRejectedError(str(e)) if isinstance(e, ValueError) else e)
            return
        self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in subs))
        fut.set_result(None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - cancel what was in flight, keep serving if we can
            self._recover(e)
            return
        t = time.monotonic()
        for out in outputs:
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            if out.finished and out.request_id in self._live:
                self._live.discard(out.request_id)
                self.metrics.finished.labels(out.finish_reason or "unknown").inc()
        if outputs:
            self._loop.call_soon_threadsafe(self._deliver, outputs, t)

    def _recover(self, error: Exception) -> None:
        """After engine.step() raised: cancel every request in flight, then check the engine:
        one step reports the aborts (and must leave nothing unfinished), one one-token forward
        (`warmup`) must run. If either fails the engine is broken: raise, ending the thread."""
        victims = sorted(self._live)
        what = f"{type(error).__name__}: {error}"
        log.error("engine.step() failed; cancelling requests %s", victims, exc_info=error)
        self.metrics.step_failures.inc()
        for rid in victims:
            self.engine.abort_request(rid)
        try:
            self.engine.step()
            if self.engine.has_unfinished_requests():
                raise RuntimeError("requests still unfinished after aborting them all")
            self.engine.warmup(prefill_sizes=[1])
        except Exception as probe_error:
            raise RuntimeError(f"engine step failed ({what}) and the engine no longer works: "
                               f"{type(probe_error).__name__}: {probe_error}") from error
        self._live.clear()
        self.metrics.finished.labels("abort").inc(len(victims))
        self._loop.call_soon_threadsafe(self._fail, victims, EngineStepError(
            f"engine step failed and cancelled this request: {what}"))

    def _publish_stats(self) -> None:
        self.last_stats = self.engine.stats()
        self.metrics.observe_stats(self.last_stats)
