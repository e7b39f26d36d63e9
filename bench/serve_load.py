"""Load test of a running `grok1 serve`: N requests at C concurrent over the OpenAI API.

    grok1 serve --checkpoint /data/grok-1 --device cuda --max-batch-size 64 &
    python bench/serve_load.py --url http://127.0.0.1:8000 --requests 500 --concurrency 32 \\
        --max-tokens 64 --out bench/results/h100x8/serve_load_c32.json

Each request streams a /v1/completions (or chat) answer with `ignore_eos` (fixed output length,
so runs compare) and `stream_options.include_usage`. Per request it records the time to the
first text chunk (TTFT), the gaps between text chunks (inter-token latency: the server sends one
chunk per engine step, i.e. per token, except while it holds back a partial UTF-8 character or a
possible stop string), the end-to-end time and the token counts (from `usage`). The JSON holds the percentiles, output tokens/s,
requests/s, the status counts and the server's /metrics snapshot; one line is printed per figure.
This is an end-to-end serving measurement, so there is no roofline beside it: compare its
tok/s with `bench/decode.py` at the same batch on the same GPU.

`run_load` is also the soak test's client (tests/server/test_server_soak.py): a fraction of requests
can disconnect mid-stream (closing the connection after the first chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = ["the", "king", "queen", "love", "night", "day", "sword", "heart", "crown", "blood", "death", "lord", "lady", "speak", "hear", "fair", "foul", "sweet", "gentle", "noble", "brother", "father", "son", "daughter", "friend", "enemy", "war", "peace", "honour", "grace", "fortune", "heaven", "earth", "fire", "water", "light", "dark", "time", "world"]


@dataclass
class RequestRecord:
    index: int
    kind: str  # "completion" | "chat"
    stream: bool
    disconnect: bool  # the client closes the connection after the first chunk
    status: int | None = None  # HTTP status; None if the connection failed
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    completion_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)
    done: bool = False  # saw `data: [DONE]` (stream) or a full JSON body
    error: str | None = None


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _body(kind: str, model: str, prompt: str, max_tokens: int, stream: bool, seed: int,
          temperature: float) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if kind == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


async def _one(client: httpx.AsyncClient, rec: RequestRecord, path: str, body: dict) -> None:
    t0 = time.perf_counter()
    try:
        if not rec.stream:
            r = await client.post(path, json=body)
            rec.status = r.status_code
            rec.e2e_s = time.perf_counter() - t0
            data = r.json()
            if r.status_code == 200:
                rec.completion_tokens = data["usage"]["completion_tokens"]
                rec.finish_reasons = [c["finish_reason"] for c in data["choices"]]
                rec.done = True
            else:
                rec.error = data.get("error", {}).get("message")
            return
        async with client.stream("POST", path, json=body) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.error = (await r.aread()).decode(errors="replace")[:300]
                return
            last = None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    rec.done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    rec.error = event["error"]["message"]
                    continue
                if event.get("usage"):
                    rec.completion_tokens = event["usage"]["completion_tokens"]
                for c in event.get("choices", []):
                    text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            rec.ttft_s = now - t0
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                        if rec.disconnect:
                            return  # leaving the `async with` closes the connection mid-stream
                    if c.get("finish_reason"):
                        rec.finish_reasons.append(c["finish_reason"])
            rec.e2e_s = time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        rec.error = f"{type(e).__name__}: {e}"


async def run_load(url: str, *, requests: int, concurrency: int, max_tokens: int,
                   model: str | None = None, prompt_words: int = 16, disconnect_fraction: float = 0.0,
                   chat_fraction: float = 0.0, nonstream_fraction: float = 0.0,
                   temperature: float = 1.0, seed: int = 0, api_key: str | None = None,
                   timeout_s: float = 600.0) -> tuple[list[RequestRecord], float]:
    """Send `requests` requests, `concurrency` at a time; (records, wall seconds)."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=timeout_s) as client:
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        jobs = []
        for i in range(requests):
            kind = "chat" if rng.random() < chat_fraction else "completion"
            stream = rng.random() >= nonstream_fraction
            disconnect = stream and rng.random() < disconnect_fraction
            rec = RequestRecord(i, kind, stream, disconnect)
            path, body = _body(kind, model, make_prompt(rng, prompt_words), max_tokens, stream,
                               seed * 1_000_003 + i, temperature)
            jobs.append((rec, path, body))
        todo = iter(jobs)

        async def worker() -> None:
            for rec, path, body in todo:  # one shared iterator: each job taken once
                await _one(client, rec, path, body)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - t0
    return [rec for rec, _, _ in jobs], wall_s


def _percentiles_ms(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def pct(p: float) -> float:
        return 1e3 * v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]
    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": 1e3 * statistics.fmean(v),
            "n": len(v)}


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    full = [r for r in records if r.done and not r.disconnect]
    out_tokens = sum(r.completion_tokens or 0 for r in full)
    return {
        "wall_s": wall_s, "statuses": statuses,
        "completed": len(full), "disconnected": sum(r.disconnect for r in records),
        "errors": sum(r.error is not None for r in records),
        "output_tokens": out_tokens, "output_tok_s": out_tokens / wall_s,
        "requests_per_s": len(full) / wall_s,
        "ttft_ms": _percentiles_ms([r.ttft_s for r in records if r.ttft_s is not None]),
        "itl_ms": _percentiles_ms([x for r in full for x in r.itl_s]),
        "e2e_ms": _percentiles_ms([r.e2e_s for r in full if r.e2e_s is not None]),
    }


def _server_metrics(url: str) -> dict[str, float]:
    keep = ("grok1_generation_tokens_total", "grok1_prompt_tokens_total", "grok1_kv_cache_",
            "grok1_num_requests_", "grok1_num_preempted", "grok1_http_requests_total",
            "grok1_time_to_first_token_seconds_sum", "grok1_time_to_first_token_seconds_count",
            "grok1_inter_token_latency_seconds_sum", "grok1_inter_token_latency_seconds_count",
            "grok1_engine_warmup_seconds")
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith(keep):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def _sample_running(url: str, out: list[float], period_s: float = 0.25) -> None:
    """Append the server's grok1_num_requests_running to `out` every period_s until cancelled
    (the first sample after the load's first request is admitted)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while True:
            await asyncio.sleep(period_s)
            try:
                text = (await client.get("/metrics")).text
            except httpx.HTTPError:
                continue
            for line in text.splitlines():
                if line.startswith("grok1_num_requests_running "):
                    out.append(float(line.rpartition(" ")[2]))


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chat-fraction", type=float, default=0.0)
    p.add_argument("--disconnect-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="hardware/conditions, e.g. 'H100x8 int8 tp8'")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)

    async def load_and_sample() -> tuple[list[RequestRecord], float, list[float]]:
        running: list[float] = []
        sampler = asyncio.ensure_future(_sample_running(args.url, running))
        try:
            records, wall_s = await run_load(
                args.url, requests=args.requests, concurrency=args.concurrency,
                max_tokens=args.max_tokens, model=args.model, prompt_words=args.prompt_words,
                disconnect_fraction=args.disconnect_fraction, chat_fraction=args.chat_fraction,
                temperature=args.temperature, seed=args.seed, api_key=args.api_key)
        finally:
            sampler.cancel()
        return records, wall_s, running

    records, wall_s, running = asyncio.run(load_and_sample())
    s = summarize(records, wall_s)
    if running:  # the engine's batch over the run, as /metrics showed it every 0.25 s
        s["running"] = {"mean": statistics.fmean(running), "max": max(running),
                        "n": len(running)}
    result = {"benchmark": "serve_load", "label": args.label, "url": args.url,
              "requests": args.requests, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
              **s, "server_metrics": _server_metrics(args.url), "git_sha": _git_sha(),
              "command": " ".join([Path(sys.executable).name] + sys.argv),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"serve c={args.concurrency} n={args.requests} max_tokens={args.max_tokens}: "
          f"{s['output_tok_s']:.1f} output tok/s, {s['requests_per_s']:.2f} req/s, "
          f"statuses {s['statuses']}, errors {s['errors']}")
    if "running" in s:
        print(f"  engine batch (requests running, sampled): mean {s['running']['mean']:.1f}, "
              f"max {s['running']['max']:.0f}")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        q = s[name]
        if q:
            print(f"  {name[:-3]:5s} p50 {q['p50']:.1f} ms | p90 {q['p90']:.1f} ms | "
                  f"p99 {q['p99']:.1f} ms | mean {q['mean']:.1f} ms (n={q['n']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    if any(int(k) >= 500 for k in s["statuses"] if k != "None"):
        raise SystemExit("server answered 5xx; see the JSON's statuses")


if __name__ == "__main__":
    main()
