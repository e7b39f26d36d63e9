"""Grok-2 behind `grok1 generate` and `grok1 serve`: the tokenizer's kind and the chat template
come from the checkpoint's family (grok1.loading.model_family), not from a path; its <|eos|> and
<|separator|> end a reply. On a folder of the golden's Grok-2 weights (vocabulary 1024) beside a
synthetic tokenizer.tok.json of 1024 tokens (tests/grok2_tokenizer_file.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from grok2_reference import GOLDEN2
from grok2_tokenizer_file import golden_release_folder, write_tok_json

pytest.importorskip("fastapi")

import grok1  # noqa: E402
from grok1.generation import generate  # noqa: E402
from grok1.loading import load_tokenizer, model_family  # noqa: E402
from grok1.sampling import SamplingParams  # noqa: E402
from grok1.server import protocol as P  # noqa: E402
from grok1.server.serving import OpenAIServing  # noqa: E402
from grok1.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from grok1.tokenizer_grok2 import TOKENIZER_FILE, Grok2Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grok2_folder(tmp_path_factory, golden2_dir) -> Path:
    """The golden's release files (linked) and a tokenizer.tok.json of its vocabulary."""
    return golden_release_folder(tmp_path_factory.mktemp("grok2") / "grok-2-tiny", golden2_dir)


def serving(tokenizer, chat_template: str) -> OpenAIServing:
    return OpenAIServing(tokenizer, "m", max_model_len=256, vocab_size=tokenizer.vocab_size,
                         max_n=4, max_choices=8, chat_template=chat_template)


def test_the_tokenizer_and_chat_template_come_from_the_checkpoints_format(grok2_folder,
                                                                           tmp_path):
    tok = load_tokenizer(grok2_folder)
    assert type(tok) is Grok2Tokenizer and tok.path == grok2_folder / TOKENIZER_FILE
    assert model_family(grok2_folder).chat_template == "grok-2"
    # --tokenizer names the file; its kind is still the checkpoint's
    other = write_tok_json(tmp_path / "any-name.json", n_vocab=1024)
    assert type(load_tokenizer(grok2_folder, other)) is Grok2Tokenizer
    # the golden folder itself ships none: the error names the file Grok-2 ships
    with pytest.raises(TokenizerError, match=f"no {TOKENIZER_FILE} in {GOLDEN2}"):
        load_tokenizer(GOLDEN2)
    default = grok1.default_model_dir()
    assert type(load_tokenizer(default)) is Tokenizer
    assert model_family(default).chat_template == "transcript"


def test_grok2_chat_requests_use_its_template_and_stop_on_the_separator(grok2_folder):
    tok = load_tokenizer(grok2_folder)
    req = P.ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": " Be brief. "}, {"role": "user", "content": "the hat"},
        {"role": "assistant", "content": "and"}, {"role": "user", "content": "ing?"}],
        max_tokens=5, stop=["xy"])
    job = serving(tok, "grok-2").plan_chat("r", req)
    (sub,) = job.subs
    text = ("System: Be brief.<|separator|>\n\nHuman: the hat<|separator|>\n\n"
            "Assistant: and<|separator|>\n\nHuman: ing?<|separator|>\n\nAssistant:")
    assert sub.prompt_ids == tok.encode(text) and sub.prompt_ids.count(tok.separator_id) == 4
    assert sub.params.stop_token_ids == (tok.separator_id,)
    assert job.choices["r-0"].text.stops == ["xy"]  # no Grok-1 transcript stops
    # /tokenize renders messages with the same template
    tokenized = serving(tok, "grok-2").tokenize(P.TokenizeRequest(messages=req.messages))
    assert tokenized["tokens"] == sub.prompt_ids
    # completions keep OpenAI's semantics: eos (the engine's) and the request's stops only
    completion = serving(tok, "grok-2").plan_completion(
        "c", P.CompletionRequest(model="m", prompt="the hat", max_tokens=3))
    assert completion.subs[0].params.stop_token_ids == ()


def test_the_grok1_transcript_is_unchanged_and_a_foreign_tokenizer_refused(grok2_folder):
    sp = load_tokenizer(grok1.default_model_dir())
    req = P.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    job = serving(sp, "transcript").plan_chat("r", req)
    assert job.subs[0].prompt_ids == sp.encode("User: Hi\nAssistant:")
    assert job.subs[0].params.stop_token_ids == ()
    assert job.choices["r-0"].text.stops == ["\nUser:", "\nSystem:"]
    with pytest.raises(ValueError, match="stop token '<\\|separator\\|>' is .* tokens in the "
                                         "Tokenizer given, not one special token"):
        serving(sp, "grok-2")
    with pytest.raises(ValueError, match="chat_template='chatml': one of transcript, grok-2"):
        serving(sp, "chatml")


def test_generate_on_a_grok2_folder_writes_the_models_greedy_text(grok2_folder):
    prompt = "Human: the hat<|separator|>\n\nAssistant:"
    out = subprocess.run([sys.executable, "-m", "grok1", "generate", "--checkpoint",
                          str(grok2_folder), "--device", "cpu", "--max-tokens", "12",
                          "--temperature", "0", prompt], capture_output=True, text=True,
                         timeout=120, check=False, cwd=REPO)
    assert out.returncode == 0, out.stderr
    tok = Grok2Tokenizer(grok2_folder / TOKENIZER_FILE)
    model = grok1.load(grok2_folder, progress=False)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=tok.stop_ids)
    with torch.no_grad():
        (result,) = generate(model, [tok.encode(prompt)], params)
    assert tok.stop_ids == (2, 1)  # <|eos|>, <|separator|>
    assert out.stdout == prompt + tok.decode(result.token_ids) + "\n"
    assert len(result.token_ids) >= 1


def test_serve_answers_a_grok2_chat_with_its_template_and_the_engines_greedy_reply(grok2_folder):
    """`grok1 serve --checkpoint` a Grok-2 folder (build_app: the engine over the golden's
    weights): the chat endpoint sends the template's tokens and stops on <|separator|>, so the
    reply is the engine's own greedy continuation of that prompt, cut at eos or the separator."""
    import argparse

    import httpx

    from grok1.engine.llm import LLM
    from grok1.server.cli_serve import add_serve_args, build_app, serve_in_thread

    p = argparse.ArgumentParser()
    add_serve_args(p)
    app = build_app(p.parse_args(["--checkpoint", str(grok2_folder), "--device", "cpu",
                                  "--max-batch-size", "2", "--max-model-len", "128"]))
    engine = app.state.bridge.engine
    tok = Grok2Tokenizer(grok2_folder / TOKENIZER_FILE)
    messages = [{"role": "user", "content": "the hat"}]
    body = {"model": "grok-2-tiny", "messages": messages, "max_tokens": 24, "temperature": 0}
    # the model's logits are capped at 50: a bias of 100 makes <|separator|> its first token
    biased = {**body, "logit_bias": {str(tok.separator_id): 100}}
    with serve_in_thread(app) as url:
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        ended = httpx.post(url + "/v1/chat/completions", json=biased, timeout=120).json()
    assert ended["choices"][0]["finish_reason"] == "stop"  # the separator ends the reply ...
    assert ended["choices"][0]["message"]["content"] == ""  # ... unshown, as eos would
    ids = tok.encode("Human: the hat<|separator|>\n\nAssistant:")
    assert reply["usage"]["prompt_tokens"] == len(ids)
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=tok.stop_ids)
    (expected,) = LLM(engine.model, tok, max_model_len=128, max_batch_size=2).generate(
        [ids], params)
    choice = reply["choices"][0]
    assert choice["message"]["content"] == tok.decode(expected.token_ids).lstrip()
    assert choice["finish_reason"] == expected.finish_reason
    assert len(expected.token_ids) > 1  # a reply, not an immediate stop
