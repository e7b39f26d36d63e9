"""lm-evaluation-harness end to end against a real `grok1 serve` of the embedded model on
127.0.0.1 (issue 17): one local task of each output type (tests/data/lm_eval: the hub is
unreachable), run through lm-eval's Python API with its `local-completions` model and remote
tokenizer, and its metrics checked against those computed here from the engine's own logprobs
and greedy generations (an in-process Engine over the same model, same settings, one request
at a time as lm-eval sends them, so the numbers agree to the last bit)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
yaml = pytest.importorskip("yaml")

from _processes import free_port, wait_until_healthy

import grok1
from grok1.engine.llm import Engine, SamplingParams
from grok1.server.cli_serve import DEFAULT_MODEL_NAME

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "data" / "lm_eval"
KINDS = ("loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until")


@pytest.fixture(scope="module")
def served():
    """(completions URL, tokenizer, engine): `grok1 serve` of the embedded model, and an
    engine over the same model with the server's default settings."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GROK1_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "grok1", "serve", "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(url, proc)
        model = grok1.load(grok1.default_model_dir(), device="cpu", progress=False)
        tokenizer = grok1.Tokenizer(grok1.default_model_dir() / "tokenizer.model")
        yield url + "/v1/completions", tokenizer, Engine(model)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def task_config(kind: str) -> dict:
    config = yaml.safe_load((TASKS / f"grok1_{kind}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {k: str(TASKS / v) for k, v in files.items()}
    return config


def evaluate(url: str, kind: str) -> dict:
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": url, "model": DEFAULT_MODEL_NAME, "tokenizer_backend": "remote",
                    "tokenized_requests": True, "max_length": 512, "num_concurrent": 1},
        tasks=[task_config(kind)], batch_size=1, log_samples=True)
    return out["results"][f"grok1_{kind}"], out["samples"][f"grok1_{kind}"]


def run_alone(engine: Engine, ids: list[int], params: SamplingParams):
    """The engine's outputs for one request run by itself."""
    engine.add_request("ref", ids, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def loglikelihood(engine: Engine, tokenizer, context: str, continuation: str,
                  prefix: int | None = None) -> tuple[float, bool]:
    """(log p(continuation | context), whether each continuation token is the argmax) from the
    engine's prompt logprobs, the pair tokenized as lm-eval does (the whole, then the context)."""
    if prefix is not None:  # rolling: the whole text after lm-eval's prefix token
        context_ids, continuation_ids = [prefix], tokenizer.encode(continuation)
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = tokenizer.encode(context + continuation)
        context_ids = tokenizer.encode(context)
        continuation_ids = whole[len(context_ids):]
    (out,) = run_alone(engine, context_ids + continuation_ids,
                       SamplingParams(max_tokens=0, prompt_logprobs=0))
    scored = out.prompt_logprobs[len(context_ids):]
    return sum(lp.logprob for lp in scored), all(lp.rank == 1 for lp in scored)


def test_lm_eval_metrics_equal_the_engines_own(served):
    url, tokenizer, engine = served
    docs = {name: [json.loads(line) for line in (TASKS / name).open()]
            for name in ("lines.jsonl", "choices.jsonl")}
    lines, mc = docs["lines.jsonl"], docs["choices.jsonl"]

    got, _ = evaluate(url, "loglikelihood")
    scores = [loglikelihood(engine, tokenizer, d["context"], d["continuation"]) for d in lines]
    lls = [ll for ll, _ in scores]
    assert got["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-9)
    assert got["acc,none"] == pytest.approx(sum(g for _, g in scores) / len(scores))
    assert 0 < got["acc,none"] < 1  # the data has greedy and non-greedy continuations

    got, _ = evaluate(url, "multiple_choice")
    acc = acc_norm = 0
    for d in mc:
        lls = [loglikelihood(engine, tokenizer, d["question"], " " + c)[0] for c in d["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == d["answer"]
        normed = [ll / len(c) for ll, c in zip(lls, d["choices"])]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == d["answer"]
    assert got["acc,none"] == pytest.approx(acc / len(mc))
    assert got["acc_norm,none"] == pytest.approx(acc_norm / len(mc))

    got, _ = evaluate(url, "loglikelihood_rolling")
    bos = tokenizer.bos_id  # lm-eval's prefix token: the server's bos_token (/tokenizer_info)
    total = sum(loglikelihood(engine, tokenizer, "", d["text"], prefix=bos)[0] for d in lines)
    words = sum(len(re.split(r"\s+", d["text"])) for d in lines)
    nbytes = sum(len(d["text"].encode()) for d in lines)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-9)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-9)
    assert got["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-9)

    got, samples = evaluate(url, "generate_until")
    mine = []
    for d in lines:
        prompt = tokenizer.encode(d["context"])
        outs = run_alone(engine, prompt, SamplingParams(max_tokens=8, temperature=0.0))
        generated = [t for o in outs for t in o.new_token_ids]
        # decoded after the prompt, so that the first piece keeps its leading space
        text = tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)):]
        mine.append(text.split("\n")[0])
    by_doc = {s["doc_id"]: s["resps"][0][0] for s in samples}
    assert [by_doc[i] for i in range(len(lines))] == mine
    exact = sum(m == d["continuation"] for m, d in zip(mine, lines)) / len(lines)
    assert got["exact_match,none"] == pytest.approx(exact)
    assert 0 < exact < 1  # the data has matched and unmatched continuations
