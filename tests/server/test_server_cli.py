"""`grok1 serve` as a process: loads a checkpoint folder, serves on loopback, and on SIGTERM lets
the request in flight finish before exiting cleanly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _processes import free_port, wait_until_healthy

from grok1 import random_weights
from grok1.checkpoint import save_native
from grok1.config import GrokConfig
from grok1.server.cli_serve import DEFAULT_MODEL_NAME, add_serve_args

REPO = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):
    """A tiny random Grok1 with the real 131072-token vocabulary, as a grok1 folder."""
    config = GrokConfig.preset("tiny").replace(vocab_size=131072, sequence_len=256)
    model = random_weights(config, quantized=False)
    return save_native(model, tmp_path_factory.mktemp("serve") / "tiny-grok", tokenizer_path)


def test_serve_args_default_to_loopback_and_no_key():
    import argparse
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args([])
    assert (args.host, args.port, args.api_key, args.checkpoint) == ("127.0.0.1", 8000, None, None)
    args = p.parse_args(["--port", "9001", "--api-key", "k", "--max-batch-size", "8"])
    assert (args.port, args.api_key, args.max_batch_size) == (9001, "k", 8)


def test_serve_process_answers_then_finishes_in_flight_stream_on_sigterm(checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GROK1_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "grok1.server.cli_serve", "--checkpoint", str(checkpoint),
         "--port", str(port), "--device", "cpu", "--max-batch-size", "4", "--log-level",
         "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(url, proc)
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][0]["id"] == "tiny-grok"  # the checkpoint folder's name
        body = {"model": "tiny-grok", "prompt": "ROMEO:", "max_tokens": 40, "stream": True,
                "ignore_eos": True, "temperature": 0}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)  # mid-stream: it must still finish
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal it caught once shutdown is done: killed by SIGTERM, cleanly
        assert proc.wait(timeout=60) == -signal.SIGTERM
        log = proc.stdout.read()
        assert "Traceback" not in log and "ERROR" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_default_model_name_is_used_for_the_embedded_model():
    from grok1.assets import default_model_dir
    if not (default_model_dir() / "model.safetensors").exists():
        pytest.skip("the embedded default model is not there yet")
    import argparse

    from grok1.server.cli_serve import build_app
    p = argparse.ArgumentParser()
    add_serve_args(p)
    app = build_app(p.parse_args(["--device", "cpu", "--max-batch-size", "4"]))
    assert app.state.bridge.engine.max_model_len > 0
    assert DEFAULT_MODEL_NAME == "grok1-default"
