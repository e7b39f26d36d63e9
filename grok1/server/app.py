"""OpenAI-compatible HTTP API over the grok1 engine: FastAPI, SSE streaming, Prometheus metrics.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET
/v1/models/{id}, and vLLM's POST /tokenize, POST /detokenize and GET /tokenizer_info (these need
`Authorization: Bearer KEY` when the server has an API key), GET /version, GET /health,
GET /metrics, and GET /openapi.json (the request schemas of protocol.py, for clients and
fuzzers).
The server listens only once the engine is warmed up (bridge.py: kernel compiles and CUDA graphs
happen at start-up, not under the first requests), so a reachable /health means ready.
The chat prompt format and the request semantics are in serving.py's docstring.

Errors are OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}`: 400 for malformed
JSON, bad or out-of-range fields, empty prompts and prompts that do not fit the context; 401 for a
missing or wrong API key; 404 for an unknown model (OpenAI's `model_not_found`) or route; 405 with
Allow for a wrong method; 413 for an oversized body; 415 for a body not declared JSON; 503 with
Retry-After when the queue is full or the server is shutting down or broken. A 5xx is a server
bug and is logged with the request id (also sent as the X-Request-Id header).

Cancellation: a streamed response closes its engine requests however it ends (client gone,
task cancelled, client not reading for write_timeout_s); a non-streamed one watches for the
client's disconnect while it waits (then 499, counted in grok1_client_aborts).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version

import asyncio
import gc
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from grok1.engine.llm import Engine
from grok1.server import protocol as P
from grok1.server.bridge import EngineBridge, RequestGroup, ServerMetrics
from grok1.server.detokenize import TokenizerLike
from grok1.server.serving import Job, OpenAIServing, as_protocol_error

log = logging.getLogger("grok1.server")


def package_version() -> str:
    """grok1's version: the installed package's, or, run from a checkout that was not installed
    (PYTHONPATH), its pyproject.toml's; "unknown" if neither exists."""
    try:
        return _package_version("grok1")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        if not pyproject.is_file():
            return "unknown"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


grok1_version = package_version()

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
          "/tokenizer_info", "/version", "/health", "/metrics", "/openapi.json")
_REQUEST_SCHEMAS = {"/v1/completions": P.CompletionRequest,
                    "/v1/chat/completions": P.ChatCompletionRequest,
                    "/tokenize": P.TokenizeRequest, "/detokenize": P.DetokenizeRequest}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the JSON request bodies, which the handlers read themselves
    (size limit, Content-Type, strict parsing in the worker pool) and FastAPI cannot see."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in _REQUEST_SCHEMAS.values()],
                                     ref_template="#/components/schemas/{model}")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        for path, model in _REQUEST_SCHEMAS.items():
            doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = doc
    return app.openapi_schema


def _error_response(e: P.ProtocolError, rid: str | None = None) -> JSONResponse:
    headers = {"X-Request-Id": rid} if rid else {}
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(e.retry_after_s)
    return JSONResponse(P.error_body(e), status_code=e.status, headers=headers)


def _check_auth(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode()):
        raise P.ProtocolError(f"{'wrong' if auth else 'missing'} API key: send the header "
                              "'Authorization: Bearer KEY'", status=401, code="invalid_api_key")


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body: 415 unless it is declared JSON, 413 past max_body_bytes."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        raise P.ProtocolError(f"Content-Type {content_type or '(none)'!r}: the body must be JSON "
                              "sent as 'Content-Type: application/json'", status=415,
                              code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
        raise P.ProtocolError(f"request body of {length} bytes exceeds the limit of "
                              f"{max_body_bytes}", status=413, code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise P.ProtocolError(f"request body exceeds the limit of {max_body_bytes} bytes",
                                  status=413, code="body_too_large")
    return bytes(body)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _parse(body: bytes, schema: type[BaseModel]) -> Any:
    """The body as `schema`: 400 for bad JSON (invalid UTF-8 and NaN included) or fields."""
    try:
        obj = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise P.ProtocolError(f"malformed JSON body: {str(e)[:200]}",
                              code="invalid_json") from None
    if not isinstance(obj, dict):
        raise P.ProtocolError(f"the JSON body must be an object, got {type(obj).__name__}",
                              code="invalid_json")
    try:
        req = schema.model_validate(obj)
    except ValidationError as e:
        raise P.error_from_validation(e) from None
    if req.unknown_fields:  # vLLM's behaviour: clients send fields of other APIs' versions
        log.warning("ignoring unknown request fields: %s", _shown_names(req.unknown_fields))
    return req


def _shown_names(names: list[str], most: int = 16, chars: int = 64) -> str:
    """Field names for one log line: escaped (a name may hold a newline), each cut to `chars`,
    at most `most` of them (the body limit is the only bound on what a client sends)."""
    shown = [n[:chars].encode("unicode_escape").decode() for n in names[:most]]
    more = f" (and {len(names) - most} more)" if len(names) > most else ""
    return ", ".join(shown) + more


class _WriteTimeout(Exception):
    """A chunk of a stream could not be sent within the write timeout."""


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that closes its request group however the response ends (finished,
    client gone, task cancelled, client not reading), even if the body iterator never started.
    A chunk the client does not take within write_timeout_s ends the response: its engine
    requests are aborted, and uvicorn closes the connection of the unfinished response."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup, rid: str,
                 write_timeout_s: float, metrics: ServerMetrics):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  "X-Request-Id": rid})
        self.group, self.rid = group, rid
        self.write_timeout_s, self.metrics = write_timeout_s, metrics

    async def __call__(self, scope, receive, send) -> None:
        async def send_in_time(message) -> None:
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    await send(message)  # waits while the socket's buffers are full
            except TimeoutError:
                raise _WriteTimeout from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except _WriteTimeout:
            # uvicorn then closes the connection, logging "ASGI callable returned without
            # completing response": the final chunk could not be sent either
            log.warning("request %s: the client took nothing for %g s; aborted", self.rid,
                        self.write_timeout_s)
            self.metrics.client_aborts.labels("write_timeout").inc()
        finally:
            self.group.close()


async def _unless_disconnected(request: Request, work: Awaitable[Response],
                               metrics: ServerMetrics) -> Response:
    """Run a non-streaming request's work, cancelling it if the client disconnects first
    (answered 499 and counted as a client abort)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # a cancelled task is done only once it has unwound
    if task.cancelled():
        metrics.client_aborts.labels("disconnected").inc()
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return task.result()


class _MetricsMiddleware:
    """Counts answered requests by route and status (499: client left before an answer)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 499

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"] if scope["path"] in ROUTES else "other"
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(path, str(status)).inc()


def create_app(engine: Engine, tokenizer: TokenizerLike, model_name: str,
               api_key: str | None = None, *, max_pending: int = 256, max_n: int = 16,
               max_choices: int = 64, max_body_bytes: int = 4 << 20,
               shutdown_grace_s: float = 30.0, max_prompt_chars: int | None = None,
               worker_threads: int = 4, write_timeout_s: float = 30.0,
               max_buffered_outputs: int = 1024,
               on_engine_failure: Callable[[str], None] | None = None,
               chat_template: str = "transcript",
               adapter_names: tuple[str, ...] = ()) -> FastAPI:
    """The OpenAI-compatible app over `engine`, which it runs on its own thread while served
    (`app.state.bridge`: the EngineBridge).

    max_pending: engine requests admitted at once (running + waiting); more get 503.
    max_n / max_choices: limits on n and on prompts x n per request (<= max_pending).
    max_prompt_chars: longest text prompt (chat: transcript) tokenized; longer ones get 400
    (default serving.MAX_CHARS_PER_TOKEN per token of context).
    worker_threads: the pool that parses, tokenizes and detokenizes off the event loop.
    write_timeout_s: a stream chunk the client does not take within this ends the stream.
    max_buffered_outputs: engine outputs a request may have waiting to be sent (a client that
    stopped reading) before it is aborted and its slots are freed.
    shutdown_grace_s: how long shutdown lets in-flight requests finish before cancelling them.
    on_engine_failure(reason): called once the engine is broken (bridge.py); /health then
    answers 503 with the reason. `grok1 serve` stops and exits non-zero.
    chat_template: the model's entry of serving.CHAT_TEMPLATES (the checkpoint family's,
    grok1.loading.Family.chat_template).
    adapter_names: the served names of the engine's LoRA adapters 1..n (Engine(adapters=...)),
    listed by /v1/models beside the base and selected by a request's `model`.
    """
    metrics = ServerMetrics()
    bridge = EngineBridge(engine, max_pending=max_pending, metrics=metrics,
                          on_fatal=on_engine_failure, max_buffered_outputs=max_buffered_outputs)
    serving = OpenAIServing(tokenizer, model_name, max_model_len=engine.max_model_len,
                            vocab_size=engine.config.vocab_size, max_n=max_n,
                            max_choices=min(max_choices, max_pending),
                            max_prompt_chars=max_prompt_chars, worker_threads=worker_threads,
                            chat_template=chat_template,
                            adapter_names=tuple(adapter_names))
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await bridge.start()
        # The start-up heap (torch, the model, the warm-up's objects: ~300k objects) is static
        # from here on; frozen, the oldest-generation collections while serving skip it. Scanned,
        # each one stops the event loop and the engine thread for 0.2-0.5 s on 2 CPU cores
        # (measured, tests/server/test_server_warmup.py), a stall of every stream in flight. vLLM's
        # server does the same after its start-up.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await bridge.shutdown(grace_s=shutdown_grace_s)
            gc.unfreeze()  # a process that serves again (tests) starts from a normal heap

    app = FastAPI(title="grok1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.openapi = lambda: _openapi(app)
    app.state.bridge = bridge
    app.state.metrics = metrics
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        response = _error_response(P.ProtocolError(str(e.detail), status=e.status_code,
                                                   code=code))
        response.headers.update(e.headers or {})  # 405: Allow, as RFC 9110 requires
        return response

    def endpoint(prefix: str, handler: Callable[[Request, str], Awaitable[Response]]):
        async def run(request: Request) -> Response:
            rid = f"{prefix}-{uuid.uuid4().hex}"
            try:
                _check_auth(request, api_key)
                return await handler(request, rid)
            except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
                return _error_response(as_protocol_error(e, rid), rid)
        return run

    async def serve(request: Request, job: Job) -> Response:
        if job.req.stream:
            group = await bridge.submit(job.subs)
            return _SSEResponse(serving.stream(job, group), group, job.rid, write_timeout_s,
                                metrics)

        async def work() -> Response:
            group = await bridge.submit(job.subs)
            try:
                result = await serving.collect(job, group)
            finally:
                group.close()
            return JSONResponse(result.model_dump(), headers={"X-Request-Id": job.rid})

        return await _unless_disconnected(request, work(), metrics)

    # JSON parsing, validation and tokenizing run in the worker pool (serving.offload): a big
    # body must not stall the event loop, which serves every other request and stream
    async def completions(request: Request, rid: str) -> Response:
        body = await _read_body(request, max_body_bytes)
        return await serve(request, await serving.offload(
            lambda: serving.plan_completion(rid, _parse(body, P.CompletionRequest))))

    async def chat_completions(request: Request, rid: str) -> Response:
        body = await _read_body(request, max_body_bytes)
        return await serve(request, await serving.offload(
            lambda: serving.plan_chat(rid, _parse(body, P.ChatCompletionRequest))))

    cards = [P.ModelCard(id=name, created=created, max_model_len=engine.max_model_len,
                         parent=None if name == model_name else model_name)
             for name in (model_name, *adapter_names)]

    async def models(_request: Request, _rid: str) -> Response:
        return JSONResponse(P.ModelList(data=cards).model_dump())

    async def model(request: Request, _rid: str) -> Response:
        return JSONResponse(cards[serving._check_optional_model(
            request.path_params["model_id"])].model_dump())

    async def tokenize(request: Request, _rid: str) -> Response:
        body = await _read_body(request, max_body_bytes)
        return JSONResponse(await serving.offload(
            lambda: serving.tokenize(_parse(body, P.TokenizeRequest))))

    async def detokenize(request: Request, _rid: str) -> Response:
        body = await _read_body(request, max_body_bytes)
        return JSONResponse(await serving.offload(
            lambda: serving.detokenize(_parse(body, P.DetokenizeRequest))))

    async def tokenizer_info(_request: Request, _rid: str) -> Response:
        return JSONResponse(serving.tokenizer_info())

    app.add_api_route("/v1/completions", endpoint("cmpl", completions), methods=["POST"],
                      name="completions")
    app.add_api_route("/v1/chat/completions", endpoint("chatcmpl", chat_completions),
                      methods=["POST"], name="chat_completions")
    app.add_api_route("/v1/models", endpoint("models", models), methods=["GET"], name="models")
    app.add_api_route("/v1/models/{model_id:path}", endpoint("model", model), methods=["GET"],
                      name="model")
    app.add_api_route("/tokenize", endpoint("tok", tokenize), methods=["POST"], name="tokenize")
    app.add_api_route("/detokenize", endpoint("detok", detokenize), methods=["POST"],
                      name="detokenize")
    app.add_api_route("/tokenizer_info", endpoint("tokinfo", tokenizer_info), methods=["GET"],
                      name="tokenizer_info")

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": grok1_version})

    @app.get("/health")
    async def health() -> JSONResponse:
        if bridge.healthy:
            return JSONResponse({"status": "ok"})
        if bridge.dead_reason is not None:  # broken for good: the process is about to exit
            return JSONResponse({"status": "failed", "reason": bridge.dead_reason},
                                status_code=503)
        return JSONResponse({"status": "unavailable"}, status_code=503)  # starting or stopping

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
