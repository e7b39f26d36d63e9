"""`grok1 serve` under torchrun: rank 0 serves HTTP and drives the other ranks' engines step by
step (grok1.parallel.control). The protocol is tested in one process (two engines, a queue for
the gloo group); the whole thing as 2 CPU ranks (gloo) on the embedded default model, whose
greedy text must equal one process's (a trained model: the split's f32 reordering moves no
argmax, tests/parallel/test_parallel_dist.py)."""

import contextlib
import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _processes import free_port, wait_until_healthy

from grok1.parallel.control import LeaderEngine, RankDivergenceError, follow
from grok1.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "grok1" / "assets" / "default"
needs_default = pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(),
                                   reason="the embedded default model is not built yet")


class QueueChannel:
    """ControlChannel's send/recv through one in-process queue (one follower)."""

    def __init__(self, rank: int, q: queue.Queue):
        self.rank, self.q = rank, q

    def send(self, msg) -> None:
        self.q.put(msg)

    def recv(self):
        return self.q.get(timeout=30)


@needs_default
def test_a_follower_replays_the_leaders_adds_aborts_and_steps_token_for_token():
    from grok1.loading import load
    from grok1.engine.llm import Engine

    model = load(DEFAULT_MODEL, device="cpu", progress=False)
    q: queue.Queue = queue.Queue()
    leader = LeaderEngine(Engine(model, max_batch_size=4), QueueChannel(0, q))
    follower = Engine(model, max_batch_size=4)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(steps=follow(follower, QueueChannel(1, q))))
    thread.start()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 2048, (n,), generator=g).tolist() for n in (5, 9, 4)]
    leader.warmup()
    leader.add_request("greedy", prompts[0], SamplingParams(max_tokens=6, temperature=0.0,
                                                                ignore_eos=True))
    # no seed: rank 0 must pick one for both, or the follower samples other tokens and raises
    leader.add_request("unseeded", prompts[1], SamplingParams(max_tokens=6, temperature=1.0,
                                                              ignore_eos=True))
    leader.add_request("aborted", prompts[2], SamplingParams(max_tokens=50, temperature=0.7))
    got: dict[str, list[int]] = {}
    steps = 0
    while leader.has_unfinished_requests():
        for out in leader.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
        if steps == 2:
            leader.abort_request("aborted")
    leader.stop()
    thread.join(timeout=30)
    assert result["steps"] == steps  # every step was checked against the leader's tokens
    assert len(got["greedy"]) == 6 and len(got["unseeded"]) == 6
    assert len(got["aborted"]) <= 2 and not follower.has_unfinished_requests()


def test_a_follower_whose_tokens_differ_from_rank_0s_raises():
    @dataclasses.dataclass
    class Out:
        request_id: str
        new_token_ids: list[int]
        finished: bool = False
        finish_reason: str | None = None

    class FakeEngine:
        def __init__(self, token: int):
            self.token = token

        def add_request(self, *args) -> None:
            pass

        def step(self) -> list[Out]:
            return [Out("r", [self.token])]

    q: queue.Queue = queue.Queue()
    leader = LeaderEngine(FakeEngine(7), QueueChannel(0, q))
    leader.add_request("r", [1, 2], SamplingParams(temperature=0.0))
    assert leader.step()[0].new_token_ids == [7]
    leader.stop()  # carries the digest of rank 0's step: token 7
    with pytest.raises(RankDivergenceError, match=r"rank 1 step 1: .*\(7,\)"):
        follow(FakeEngine(8), QueueChannel(1, q))


# ---- the real thing: torchrun, 2 CPU ranks --------------------------------------------------


def _complete(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": "grok1-default", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _reference(prompts: list[str], max_tokens: int) -> tuple[list[str], list[torch.Tensor]]:
    """One process's greedy texts of the prompts, and each prompt's token logprobs (after the
    first token) from the plain model."""
    from grok1.loading import load
    from grok1.generation import generate
    from grok1.server.detokenize import IncrementalDetokenizer
    from grok1.tokenizer import Tokenizer

    model = load(DEFAULT_MODEL, device="cpu", progress=False)
    tok = Tokenizer(DEFAULT_MODEL / "tokenizer.model")
    ids = [tok.encode(p) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    # the server's text: the tokens decoded after the prompt's (" a", not "a", after "be")
    texts = [IncrementalDetokenizer(tok, p).push(r.token_ids, final=True)
             for p, r in zip(ids, generate(model, ids, params))]
    scores = []
    for p in ids:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p]))[0].float(), dim=-1)
        scores.append(logp[torch.arange(len(p) - 1), torch.tensor(p[1:])])
    return texts, scores


@needs_default
def test_torchrun_serve_on_two_cpu_ranks_answers_like_one_process_and_stops_cleanly():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("GROK1_API_KEY", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "grok1", "serve", "--tp", "2", "--port", str(port), "--device", "cpu",
           "--max-batch-size", "8", "--shutdown-timeout", "5", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        prompts = ["ROMEO:", "To be, or not to be"]
        want, want_scores = _reference(prompts, 16)  # while the ranks start
        wait_until_healthy(url, proc, show_output=False)  # ranks may hold the pipe

        got = _complete(url, prompt=prompts, max_tokens=16, temperature=0)
        assert [c["text"] for c in sorted(got["choices"], key=lambda c: c["index"])] == want
        # prompt logprobs: the ranks' prefill scores each prompt token as one process does
        scored = _complete(url, prompt=prompts[1], max_tokens=0, echo=True, logprobs=1)
        token_logprobs = scored["choices"][0]["logprobs"]["token_logprobs"]
        assert token_logprobs[0] is None
        assert torch.allclose(torch.tensor(token_logprobs[1:]), want_scores[1], atol=3e-2)

        body = {"model": "grok1-default", "prompt": prompts[0], "max_tokens": 16,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == want[0]

        sampled = [_complete(url, prompt=prompts[1], max_tokens=12, n=2, seed=11,
                             temperature=1.0) for _ in range(2)]
        texts = [[c["text"] for c in sorted(s["choices"], key=lambda c: c["index"])]
                 for s in sampled]
        assert texts[0] == texts[1] and texts[0][0] != texts[0][1]  # seeded; choices differ

        body = {"model": "grok1-default", "prompt": prompts[0], "max_tokens": 400,
                "temperature": 0.8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(4)]  # then hang up mid-stream
        assert all(line.startswith("data: ") or not line for line in first)
        aborted = 'grok1_engine_requests_finished_total{reason="abort"} 1.0'
        deadline = time.monotonic() + 10
        while aborted not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline, "the hung-up stream was not aborted"
            time.sleep(0.1)
        # the followers dropped it too: they would have raised at the next step otherwise
        again = _complete(url, prompt=prompts, max_tokens=16, temperature=0)
        assert [c["text"] for c in sorted(again["choices"], key=lambda c: c["index"])] == want
        assert httpx.get(url + "/health").json() == {"status": "ok"}

        proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.returncode is None or "out" not in locals():  # failed: torchrun and its ranks
            with contextlib.suppress(ProcessLookupError):   # (their own session) go at once
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    assert "rank 0 of 2 left the process group" in out, out
    follower = re.search(r"rank 1 of 2 left the process group after following (\d+) steps", out)
    assert follower and int(follower.group(1)) >= 16 * 2 + 12, out
    assert "[rank" not in out and "Error" not in out.split("Received 15 death signal")[0], out
