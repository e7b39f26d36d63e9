"""Start-up warm-up: the server compiles and captures before it listens, so the first requests of
each batch shape do not stall everyone in flight.

The GPU load test (bench/results/NVIDIA_H100_80GB_HBM3/serve_load_c32_4layers.json: 32 streaming
clients, 10 ms decode steps) had time-to-first-token p50 65 ms but p90 4.3 s and p99 15 s, with
inter-token latency p99 23 ms but mean 21 ms: rare multi-second stalls of the whole batch. The
runner captures a CUDA graph on the first use of each decode bucket (runner._replay) and Triton
compiles each new launch specialization on first use (attention SPLITS differs per bucket, MoE
tiles per token count), all in the middle of serving. Here a scripted engine with a lazy
first-use cost per batch bucket stands in for the GPU, behind the real bridge, app and uvicorn.
"""

import asyncio
import gc
import importlib.util
import time
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from _engine_helpers import PEAKED
from test_server_bridge import FakeEngine
from test_server_units import ByteTokenizer

from grok1 import random_weights
from grok1.config import GrokConfig
from grok1.engine.llm import Engine, SamplingParams, warmup_sizes
from grok1.server.app import create_app
from grok1.server.cli_serve import serve_in_thread

_spec = importlib.util.spec_from_file_location(
    "serve_load", Path(__file__).resolve().parents[2] / "bench" / "serve_load.py")
serve_load = sys.modules.setdefault("serve_load", importlib.util.module_from_spec(_spec))
if not hasattr(serve_load, "run_load"):
    _spec.loader.exec_module(serve_load)

STEP_S = 0.010     # the H100's decode step at batch 32 (bench/engine_bench.py, 4 full-width layers)
COMPILE_S = 0.4    # first use of a bucket; a real Triton compile or capture is 0.3 s to seconds
CONCURRENCY, REQUESTS, MAX_TOKENS = 32, 64, 32


def test_server_warms_up_before_listening_so_32_streams_share_the_batch_without_stalls():
    engine = FakeEngine(vocab_size=256, max_batch_size=64, block_size=16, num_blocks=4096,
                        max_model_len=512, step_delay_s=STEP_S, compile_s=COMPILE_S)
    app = create_app(engine, ByteTokenizer(), "fake", max_pending=64 + 256)
    with serve_in_thread(app) as url:
        warm_when_listening = set(engine.compiled)
        records, wall_s = asyncio.run(asyncio.wait_for(serve_load.run_load(
            url, requests=REQUESTS, concurrency=CONCURRENCY, max_tokens=MAX_TOKENS,
            model="fake", prompt_words=8, seed=5, timeout_s=60), timeout=120))
    s = serve_load.summarize(records, wall_s)
    assert s["statuses"] == {"200": REQUESTS} and s["errors"] == 0, s
    assert set(FakeEngine.BUCKETS) <= warm_when_listening  # warmed before the first request
    # The bridge and scheduler admit every waiting request at the next step: all 32 clients'
    # requests decode in one batch (the GPU run's ~13 on average was a symptom, not a cap).
    assert max(engine.batch_sizes) >= 28, engine.batch_sizes
    # Time to first token as the server measures it (submit to first token, no HTTP): warm, a
    # request waits for the step in flight and its own step, 20-30 ms; a lazy compile stalls
    # every request in flight by COMPILE_S = 0.4 s, and with 64 requests in two waves of 32 the
    # first wave (half of them) meets it, so at most half can be fast. 100 ms (a histogram
    # bucket edge) is 3x the warm wait and a quarter of one stall; asking 75% of requests to be
    # that fast sits between the two with room for slow steps on a busy CI machine.
    # Measured on 2 overloaded cores: 92-100% warm; 0% before the server warmed up.
    registry = app.state.metrics.registry
    ttft = "grok1_time_to_first_token_seconds"
    n = registry.get_sample_value(f"{ttft}_count")
    fast = registry.get_sample_value(f"{ttft}_bucket", {"le": "0.1"})
    assert n == REQUESTS and fast / n >= 0.75, (fast, n, s["ttft_ms"])


def _full_collection_ms() -> float:
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1e3


def test_start_up_heap_is_frozen_so_full_collections_while_serving_skip_it():
    # CI (2 cores, a heap of ~300 tests' imports) failed the test above once with a third of the
    # requests 0.5 s late: an oldest-generation collection scanning the whole heap stops the event
    # loop and the engine thread alike. The server freezes what start-up left (gc.freeze).
    ballast = [[] for _ in range(1_000_000)]  # a big model server's heap: torch, the model, ...
    cold_ms = _full_collection_ms()
    app = create_app(FakeEngine(), ByteTokenizer(), "fake")
    with serve_in_thread(app):
        assert gc.get_freeze_count() >= len(ballast)
        serving_ms = _full_collection_ms()
    assert gc.get_freeze_count() == 0  # unfrozen on shutdown
    assert serving_ms < cold_ms / 4, (serving_ms, cold_ms)
    del ballast


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # exit(3)
def test_failed_warmup_fails_start_up_instead_of_serving():
    class BrokenWarmup(FakeEngine):
        def warmup(self):
            raise RuntimeError("injected warm-up failure")

    app = create_app(BrokenWarmup(), ByteTokenizer(), "fake")
    with pytest.raises(RuntimeError, match="did not start"), serve_in_thread(app):
        pass


# ---- Engine.warmup on the real engine (CPU: the eager path; graphs are CUDA-only) ------------

def _engine(**kw):
    config = GrokConfig.preset("tiny").replace(sequence_len=128)
    model = random_weights(config, quantized=False, seed=7, **PEAKED)
    return Engine(model, max_batch_size=8, block_size=16, num_blocks=64,
                  max_num_batched_tokens=64, **kw)


def _greedy(engine, prompts):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True))
    got = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    return got


def test_warmup_sizes_cover_each_power_of_two_with_and_without_a_multiple_of_16():
    sizes = warmup_sizes(2048)
    assert sizes[:5] == [1, 2, 3, 4, 5] and sizes[-1] == 2048 and sizes == sorted(set(sizes))
    for p in (16, 32, 64, 128, 256, 512, 1024):
        assert p in sizes and p + 1 in sizes
    assert max(warmup_sizes(100)) == 100 and 65 in warmup_sizes(100)


def test_engine_warmup_leaves_the_cache_empty_and_outputs_unchanged():
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 17, 40)]
    cold = _engine()
    expected = _greedy(cold, prompts)

    engine = _engine()
    assert engine.warmup().forwards == 0  # CPU default: nothing compiles, nothing to do
    report = engine.warmup(prefill_sizes=warmup_sizes(64))
    # sizes 1, 2: one lone batch each; 3..64 (10 sizes): a lone and a mixed batch each
    assert (report.forwards, report.graphs) == (2 + 2 * 10, 0)
    assert engine.stats().kv_blocks_used == 0
    assert _greedy(engine, prompts) == expected  # the scratch forwards left no trace


def test_engine_warmup_captures_every_decode_bucket_when_graphs_are_on():
    engine = _engine()
    captured = []
    engine.runner.use_graphs = True  # as on CUDA; capturing itself needs a GPU
    engine.runner.capture_all = lambda: captured.append(list(engine.runner.graph_buckets))
    engine.warmup(prefill_sizes=[])
    assert captured == [[1, 2, 4, 8]]  # the buckets up to max_batch_size=8


def test_engine_warmup_refuses_with_requests_in_flight_and_bad_sizes():
    engine = _engine()
    with pytest.raises(ValueError, match="prefill size 65 outside"):
        engine.warmup(prefill_sizes=[65])
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="in flight"):
        engine.warmup(prefill_sizes=[4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_warmup_captures_all_buckets_so_serving_captures_none():
    config = GrokConfig.preset("debug").replace(emb_size=768, key_size=64, num_q_heads=12,
                                                num_kv_heads=2, sequence_len=256)
    model = random_weights(config, quantized=True, device="cuda", **(PEAKED | {"std": 0.2}))
    engine = Engine(model, max_batch_size=8, block_size=16, num_blocks=40, max_model_len=256,
                    max_num_batched_tokens=64)
    assert engine.runner.use_graphs
    report = engine.warmup()
    assert sorted(engine.runner._graphs) == sorted(engine.runner.graph_buckets)
    assert report.graphs == len(engine.runner.graph_buckets) and report.forwards > 0
    assert engine.stats().kv_blocks_used == 0
    graphs = dict(engine.runner._graphs)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist()
               for n in (3, 9, 20, 33, 50)]
    _greedy(engine, prompts)
    assert engine.runner._graphs == graphs  # nothing captured lazily while serving
