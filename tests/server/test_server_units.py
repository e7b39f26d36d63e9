"""Server pieces without HTTP: incremental detokenization, stop strings, request schemas."""

import random
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from grok1.server import protocol as P
from grok1.server.detokenize import IncrementalDetokenizer, StopTextStream, token_text

TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "grok1" / "tokenizer.model"


class ByteTokenizer:
    """Byte-level stand-in for SentencePiece byte fallback: id = byte + 3 (0 pad, 1 bos, 2 eos)."""
    eos_id = 2
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(t - 3 for t in ids if t >= 3).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def sp_tokenizer():
    if not TOKENIZER.exists():
        pytest.skip(f"tokenizer not found at {TOKENIZER}")
    from grok1.tokenizer import Tokenizer
    return Tokenizer(TOKENIZER)


def _stream_text(tok, context: list[int], ids: list[int], chunk_sizes: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, context)
    pieces, i = [], 0
    for n in chunk_sizes:
        pieces.append(detok.push(ids[i:i + n], final=i + n >= len(ids)))
        i += n
    return pieces


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_detokenizer_never_splits_a_character_with_byte_fallback(sp_tokenizer, seed):
    rng = random.Random(seed)
    words = ["Hello", "wörld", "日本語", "𝔘𝔫𝔦", "ꙮ", "🙂", "\n\nUser", "naïve", "x"]
    text = " ".join(rng.choice(words) for _ in range(12))
    context = sp_tokenizer.encode("Once upon a time")
    ids = sp_tokenizer.encode(text)
    pieces = _stream_text(sp_tokenizer, context, ids, [1] * len(ids))
    assert all("\ufffd" not in p for p in pieces), pieces
    full = sp_tokenizer.decode(context + ids)
    assert "".join(pieces) == full[len(sp_tokenizer.decode(context)):]


def test_incremental_detokenizer_keeps_the_leading_space_after_the_prompt(sp_tokenizer):
    context = sp_tokenizer.encode("Hello")
    ids = sp_tokenizer.encode("Hello world")[1:]  # "▁world"
    assert _stream_text(sp_tokenizer, context, ids, [1]) == [" world"]


def test_incremental_detokenizer_holds_partial_utf8_bytes_until_complete():
    tok = ByteTokenizer()
    ids = tok.encode("a€b")  # € is 3 bytes
    pieces = _stream_text(tok, [], ids, [1] * len(ids))
    assert pieces == ["a", "", "", "€", "b"]


def test_incremental_detokenizer_flushes_invalid_bytes_at_the_end():
    tok = ByteTokenizer()
    ids = tok.encode("ok") + [0xE2 + 3]  # a lead byte with no continuation
    pieces = _stream_text(tok, [], ids, [1, 1, 1])
    assert pieces == ["o", "k", "\ufffd"]


def test_stop_string_truncates_and_holds_back_possible_prefixes():
    tok = ByteTokenizer()
    stream = StopTextStream(tok, [], ["\nUser:"])
    out = [stream.push(tok.encode(ch)) for ch in "Hi!\nUs"]
    assert "".join(out) == "Hi!"  # "\nUs" could start the stop string: held back
    assert stream.push(tok.encode("e")) == "" and not stream.stopped
    assert stream.push(tok.encode("r: x")) == "" and stream.stopped
    assert stream.text == "Hi!"


def test_stop_string_false_alarm_releases_held_text():
    tok = ByteTokenizer()
    stream = StopTextStream(tok, [], ["END"])
    assert stream.push(tok.encode("abcEN")) == "abc"
    assert stream.push(tok.encode("x")) == "ENx"
    assert stream.push(tok.encode("E"), final=True) == "E"
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins():
    tok = ByteTokenizer()
    stream = StopTextStream(tok, [], ["zz", "b"])
    assert stream.push(tok.encode("a b zz")) == "a " and stream.stopped


def test_token_text_of_a_sentencepiece_word_includes_its_space(sp_tokenizer):
    ids = sp_tokenizer.encode("Hello world")
    assert token_text(sp_tokenizer, ids[:1], ids[1]) == " world"


def test_completion_request_rejects_out_of_range_values():
    ok = P.CompletionRequest.model_validate({"model": "m", "prompt": "x", "stop": "a"})
    assert ok.stop == ["a"] and ok.prompts() == ["x"]
    cases = {"temperature": 2.5, "top_p": 0.0, "n": 0, "max_tokens": -1, "logprobs": 21,
             "top_k": -2, "presence_penalty": 2.5, "prompt_logprobs": 21, "min_p": 1.5,
             "repetition_penalty": 0.0, "min_tokens": -1, "logit_bias": {"x": 1.0},
             "stop_token_ids": [-1]}
    for name, value in cases.items():
        with pytest.raises(P.ValidationError) as exc:
            P.CompletionRequest.model_validate({"model": "m", "prompt": "x", name: value})
        err = P.error_from_validation(exc.value)
        assert err.status == 400
        assert name in err.message and err.param.split(".")[0] == name


def test_prompt_forms_are_lists_of_prompts():
    def prompts(p):
        return P.CompletionRequest.model_validate({"model": "m", "prompt": p}).prompts()
    assert prompts([5, 6]) == [[5, 6]]
    assert prompts([[5], [6, 7]]) == [[5], [6, 7]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([]) == [""]


def test_chat_request_error_names_the_bad_message_field():
    with pytest.raises(P.ValidationError) as exc:
        P.ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "tool"}]})
    err = P.error_from_validation(exc.value)
    assert err.param == "messages.1.role"
    with pytest.raises(P.ValidationError):
        P.ChatCompletionRequest.model_validate({"model": "m", "messages": []})


def test_version_from_a_checkout_that_was_not_installed(monkeypatch):
    """The server imports from a bare checkout too (PYTHONPATH, as on the GPU machines): with no
    installed metadata its version is pyproject.toml's."""
    import tomllib
    from pathlib import Path

    from grok1.server import app

    def not_installed(name):
        raise app.PackageNotFoundError(name)

    monkeypatch.setattr(app, "_package_version", not_installed)
    pyproject = Path(app.__file__).resolve().parents[2] / "pyproject.toml"
    assert app.package_version() == tomllib.loads(pyproject.read_text())["project"]["version"]
