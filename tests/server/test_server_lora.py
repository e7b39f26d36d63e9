"""Served LoRA adapters (grok1.checkpoint.peft.load_adapters, Engine(adapters=...), grok1 serve
--lora NAME=PATH): each request's tokens run through the adapter it names, batched with other
requests' tokens, and an adapter changes the output only of the requests that name it."""

from pathlib import Path

import pytest
import torch

import grok1
from grok1.checkpoint.peft import load_adapters, save_adapter
from grok1.engine.llm import Engine
from grok1.lora import LoraConfig, apply_lora, lora_modules
from grok1.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def base_model():
    return grok1.random_weights("tiny", quantized=True, seed=11)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Two adapters of different ranks and targets (one on the experts), random B."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for k, lora in enumerate((LoraConfig(r=4, alpha=8.0, targets=("attn.wq", "attn.wv")),
                              LoraConfig(r=2, alpha=4.0, targets=("attn.wo", "moe.w_up")))):
        model = base_model()
        apply_lora(model, lora, seed=k)
        g = torch.Generator().manual_seed(20 + k)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
        dirs.append(save_adapter(model, lora, root / f"adapter{k + 1}"))
    return dirs


def run(engine: Engine, requests: list[tuple[list[int], int]]) -> list[tuple[list[int], list]]:
    """Greedy (tokens, logits per step) of each (prompt, adapter), all in one batch."""
    for i, (prompt, adapter) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, GREEDY, adapter=adapter)
    tokens = {f"r{i}": [] for i in range(len(requests))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [(tokens[f"r{i}"], engine.logits_log[f"r{i}"]) for i in range(len(requests))]


def test_an_adapter_changes_only_the_requests_that_name_it(adapter_dirs):
    g = torch.Generator().manual_seed(3)
    p1, p2 = (torch.randint(3, 256, (n,), generator=g).tolist() for n in (7, 12))
    model = base_model()
    engine = Engine(model, max_batch_size=8, record_logits=True,
                    adapters=load_adapters(model, adapter_dirs))
    mixed = run(engine, [(p1, 0), (p1, 1), (p2, 2), (p2, 0), (p1, 2)])
    plain = run(Engine(base_model(), max_batch_size=8, record_logits=True), [(p1, 0), (p2, 0)])
    for got, want in ((mixed[0], plain[0]), (mixed[3], plain[1])):  # no adapter: the base's
        assert got[0] == want[0]
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    for k, (row, prompt) in ((1, (1, p1)), (2, (2, p2)), (2, (4, p1))):
        alone_model = base_model()  # this adapter alone, its request alone
        alone = Engine(alone_model, max_batch_size=8, record_logits=True,
                       adapters=load_adapters(alone_model, [adapter_dirs[k - 1]]))
        want = run(alone, [(prompt, 1)])[0]
        assert mixed[row][0] == want[0]
        torch.testing.assert_close(torch.stack(mixed[row][1]), torch.stack(want[1]),
                                   rtol=0, atol=0)
        base_logits = plain[0 if prompt is p1 else 1][1][0]
        assert (mixed[row][1][0] - base_logits).abs().max() > 0.05  # the adapter matters


def test_an_adapter_the_engine_does_not_hold_is_refused(adapter_dirs):
    model = base_model()
    engine = Engine(model, adapters=load_adapters(model, adapter_dirs))
    with pytest.raises(ValueError, match="adapter 3; this engine holds 2 LoRA adapter"):
        engine.add_request("x", [5, 6], GREEDY, adapter=3)
    with pytest.raises(ValueError, match="adapter 1; this engine holds 0 LoRA adapter"):
        Engine(base_model()).add_request("x", [5, 6], GREEDY, adapter=1)


# ---- over HTTP -------------------------------------------------------------------------------

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def lora_server(adapter_dirs):
    from test_server_units import ByteTokenizer

    from grok1.server.app import create_app
    from grok1.server.cli_serve import serve_in_thread

    model = base_model()
    engine = Engine(model, max_batch_size=8, adapters=load_adapters(model, adapter_dirs))
    app = create_app(engine, ByteTokenizer(), "base", adapter_names=("shout", "whisper"))
    with serve_in_thread(app) as url:
        yield url


def complete(url: str, model: str, prompt: str = "To be or not") -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def test_models_lists_the_base_and_its_adapters(lora_server):
    cards = httpx.get(lora_server + "/v1/models").json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("shout", "base"),
                                                       ("whisper", "base")]
    card = httpx.get(lora_server + "/v1/models/whisper").json()
    assert card["id"] == "whisper" and card["parent"] == "base"


def test_requests_select_adapters_by_model_name_concurrently(lora_server):
    from concurrent.futures import ThreadPoolExecutor

    alone = {m: complete(lora_server, m).json() for m in ("base", "shout", "whisper")}
    with ThreadPoolExecutor(6) as pool:  # the same requests, batched together
        together = list(pool.map(lambda m: complete(lora_server, m).json(),
                                 ["base", "shout", "whisper"] * 2))
    texts = {m: alone[m]["choices"][0]["text"] for m in alone}
    assert texts["shout"] != texts["base"] and texts["whisper"] != texts["base"]
    for r in together:
        assert r["choices"][0]["text"] == texts[r["model"]]
    assert {r["model"] for r in together} == {"base", "shout", "whisper"}


def test_an_unknown_model_is_a_404_naming_the_served_ones(lora_server):
    r = complete(lora_server, "shout2")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'shout2' does not exist; this server serves 'base', 'shout', 'whisper'" in \
        error["message"]


def test_lora_flag_values_are_checked():
    from grok1.server.cli_serve import lora_modules_arg

    assert lora_modules_arg(["a=/x", "b=y/z"], "base") == [("a", Path("/x")),
                                                           ("b", Path("y/z"))]
    for bad, match in ((["a"], "expected NAME=PATH"), (["a=x", "a=y"], "'a' is served"),
                       (["base=x"], "'base' is served")):
        with pytest.raises(SystemExit, match=match):
            lora_modules_arg(bad, "base")


def test_serve_lora_flag_builds_an_engine_holding_the_adapters(tmp_path):
    import argparse

    from grok1.server.cli_serve import add_serve_args, build_app, run_serve_ranks

    model = grok1.load(grok1.default_model_dir())
    lora = LoraConfig(r=2, targets=("attn.wq", "moe.w_down"))
    apply_lora(model, lora)
    adapter = save_adapter(model, lora, tmp_path / "ft")
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--device", "cpu", "--max-batch-size", "2", "--lora", f"ft={adapter}"])
    app = build_app(args)
    engine = app.state.bridge.engine
    assert engine.adapters is not None and engine.adapters.num_adapters == 1
    assert engine.runner.use_graphs is False
    assert engine.model.layers[3].moe.w_down.lora_A.shape[0] == 1
    with pytest.raises(SystemExit, match="--lora serves on one process"):
        run_serve_ranks(p.parse_args(["--tp", "2", "--lora", f"ft={adapter}"]))
