"""Grok-2's tokenizer (grok1.tokenizer_grok2) on a small synthetic tokenizer.tok.json in the
release's format (SPEC 5): round trips, special tokens, the digit split, the chat template."""

import pytest
from grok2_tokenizer_file import MERGES, SPECIALS, write_tok_json

from grok1.tokenizer import TokenizerError
from grok1.tokenizer_grok2 import Grok2Tokenizer, chat_prompt

@pytest.fixture
def tok(tmp_path) -> Grok2Tokenizer:
    return Grok2Tokenizer(write_tok_json(tmp_path / "tokenizer.tok.json"))


def test_ids_and_sizes(tok):
    assert tok.vocab_size == len(SPECIALS) + 256 + len(MERGES)
    assert (tok.pad_id, tok.separator_id, tok.eos_id, tok.bos_id) == (0, 1, 2, -1)
    tok.require_vocab(tok.vocab_size)
    with pytest.raises(TokenizerError, match=r"has 280 tokens but the model's vocab_size is 9"):
        tok.require_vocab(9)


@pytest.mark.parametrize("text", [
    "the cat and the hat", "Hello, World!\n\nNew paragraph.\ttab", "über naïve café",
    "日本語のテキスト", "emoji 🎉🚀 and 2024-11-28", "", "   leading and trailing   ",
])
def test_text_round_trips(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_merges_apply_and_digits_split_one_by_one(tok):
    assert tok.encode(" the") == [len(SPECIALS) + 256 + MERGES.index(b" the")]
    assert tok.encode("and") == [len(SPECIALS) + 256 + MERGES.index(b"and")]
    # PAT_STR_B splits every digit (\p{N} alone): "2024" is four tokens, one per digit byte
    assert tok.encode("2024") == [len(SPECIALS) + b for b in b"2024"]


def test_special_texts_become_their_ids(tok):
    ids = tok.encode("Human: hi<|separator|>\n\nAssistant:<|eos|>")
    assert ids.count(1) == 1 and ids[-1] == 2
    assert tok.decode(ids) == "Human: hi<|separator|>\n\nAssistant:<|eos|>"
    assert tok.encode("<|control1|><|reserved_3|><|pad|>") == [3, 4, 0]
    # a special token SGLang does not allow is encoded as plain text, byte by byte
    assert 5 not in tok.encode("<|custom|>")
    assert tok.decode(tok.encode("<|custom|>")) == "<|custom|>"
    assert [tok.id_to_piece(i) for i in (1, 2)] == ["<|separator|>", "<|eos|>"]
    assert tok.id_to_piece(len(SPECIALS) + 256 + MERGES.index(b"ing")) == "ing"


def test_default_allowed_special_is_honoured(tmp_path):
    tok = Grok2Tokenizer(write_tok_json(tmp_path / "t.json",
                                        default_allowed_special=[list(b"<|custom|>")]))
    assert tok.encode("a<|custom|>") == [len(SPECIALS) + ord("a"), 5]


def test_partial_utf8_decodes_to_replacement(tok):
    ids = tok.encode("é")  # two bytes, two tokens in this vocabulary
    assert len(ids) == 2
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.id_to_piece(ids[0]) == "\ufffd"


def test_chat_template_matches_sglang():
    messages = [{"role": "system", "content": "  Be brief. "},
                {"role": "user", "content": "What is 2+2?\n"},
                {"role": "assistant", "content": " 4"},
                {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]}]
    assert chat_prompt(messages) == (
        "System: Be brief.<|separator|>\n\n"
        "Human: What is 2+2?<|separator|>\n\n"
        "Assistant:  4<|separator|>\n\n"
        "Human: And 3+3?<|separator|>\n\n"
        "Assistant:")
    assert chat_prompt(messages[1:2], add_generation_prompt=False) == \
        "Human: What is 2+2?<|separator|>\n\n"
    assert chat_prompt([{"role": "developer", "content": "x"}]).startswith("System: x")


def test_chat_prompt_tokenizes_with_one_separator_per_turn(tok):
    ids = tok.encode(chat_prompt([{"role": "user", "content": "hi"}]))
    assert ids.count(tok.separator_id) == 1
    assert tok.decode(ids) == "Human: hi<|separator|>\n\nAssistant:"


def test_unknown_role_and_content_are_refused():
    with pytest.raises(ValueError, match=r"messages\[1\].role='tool'"):
        chat_prompt([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content: a string or a list"):
        chat_prompt([{"role": "user", "content": [{"type": "image_url"}]}])


@pytest.mark.parametrize("overrides, words", [
    ({"word_split": "V2"}, "word_split='V2'; only 'V1'"),
    ({"vocab_size": 999}, "vocab_size=999, but the file has 274 regular + 6 special"),
    ({"special_tokens": [{"bytes": list(b"<|eos|>"), "token": 7}], "vocab_size": None},
     "token ids repeat"),
    ({"special_tokens": [{"bytes": [255], "token": 0}]}, "are not UTF-8"),
    ({"regular_tokens": [{"bytes": [300], "token": 0}]}, "regular_tokens[0]="),
    ({"regular_tokens": None}, "regular_tokens missing or not a list"),
])
def test_bad_files_name_the_file_and_field(tmp_path, overrides, words):
    path = write_tok_json(tmp_path / "tokenizer.tok.json", **overrides)
    with pytest.raises(TokenizerError) as e:
        Grok2Tokenizer(path)
    assert str(e.value).startswith(f"{path}:")
    assert words in str(e.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        Grok2Tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TokenizerError, match="not a JSON tokenizer file"):
        Grok2Tokenizer(tmp_path / "bad.json")
