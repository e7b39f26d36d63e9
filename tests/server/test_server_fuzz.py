"""Schemathesis against the server's own /openapi.json: requests that fit the schema and requests
that break it, sent to a real uvicorn on 127.0.0.1 running the real engine (embedded model).
Every answer must come within the request timeout and be no server error; the counts are
printed at the end (bounded: a fixed number of examples per operation, derandomized)."""

import collections
import time

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from test_server import MODEL, make_engine_and_tokenizer

from grok1.server.app import create_app
from grok1.server.cli_serve import serve_in_thread

EXAMPLES_PER_MODE = 150  # per operation and mode (positive, negative)
REQUEST_TIMEOUT_S = 30.0  # an answer slower than this is a hang
sent: collections.Counter = collections.Counter()  # (path, status class) -> requests
slowest_ms = [0]


@pytest.fixture(scope="module")
def fuzz_server():
    # a small context keeps generated prompts cheap; max_tokens is capped by it
    engine, tokenizer = make_engine_and_tokenizer(max_batch_size=8, max_model_len=64)
    app = create_app(engine, tokenizer, MODEL, max_n=4)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def server_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server[0] + "/openapi.json")


# schemathesis' own pytest loader (from_fixture) does not run under pytest 9 (it sets a
# Function attribute pytest 9 removed), so each operation's strategy is driven by hypothesis
@pytest.mark.parametrize("mode", list(GenerationMode))
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_no_generated_request_gets_a_server_error_or_hangs(server_schema, path, mode):
    operation = server_schema[path]["POST"]

    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def send(case) -> None:
        if isinstance(case.body, dict) and mode is GenerationMode.POSITIVE:
            case.body["model"] = MODEL  # else nearly every request stops at the model's 404
        t0 = time.monotonic()
        response = case.call(timeout=REQUEST_TIMEOUT_S)
        sent[(path, response.status_code // 100 * 100)] += 1
        slowest_ms[0] = max(slowest_ms[0], int((time.monotonic() - t0) * 1e3))
        case.validate_response(response, checks=[not_a_server_error])

    send()


def test_fuzz_report_counts_requests_and_the_server_is_still_healthy(fuzz_server, capsys):
    import httpx

    total = sum(sent.values())
    errors = sum(n for (_, status), n in sent.items() if status >= 500)
    by_class = {f"{path} {status}": n for (path, status), n in sorted(sent.items())}
    with capsys.disabled():
        print(f"\nserver fuzz: {total} requests, {errors} server errors, 0 hangs, slowest "
              f"{slowest_ms[0]} ms; by path and status class: {by_class}")
    assert total >= 4 * EXAMPLES_PER_MODE and errors == 0
    assert sent[("/v1/completions", 200)] > 0 and sent[("/v1/completions", 400)] > 0
    assert httpx.get(fuzz_server[0] + "/health").status_code == 200
