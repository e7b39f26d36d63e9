"""Grok-2's tokenizer: xAI's `tokenizer.tok.json` through tiktoken, and its chat template.

The file (SPEC section 5; read as SGLang's tiktoken_tokenizer.py and vLLM's tokenizers/grok2.py
read it): a JSON object with
    regular_tokens: [{"bytes": [int, ...], "token": id}, ...]   tiktoken's mergeable ranks
    special_tokens: [{"bytes": [int, ...], "token": id}, ...]   UTF-8 texts such as <|eos|>
    word_split: "V1"                  the pre-split regex PAT_STR_B below (single digits)
    pat_str (optional)                overrides that regex
    vocab_size (optional)             tiktoken's explicit_n_vocab: every id below it is used
    default_allowed_special (optional) more special texts encoded as specials (vLLM honours it)
Encoding adds no BOS/EOS; the special texts SGLang allows (pad, separator, eos, the control and
reserved tokens) become their special ids wherever they appear in the text, as in SGLang.

Same interface as grok1.tokenizer.Tokenizer (encode, decode, vocab_size, pad_id, eos_id, bos_id,
stop_ids, id_to_piece, require_vocab), so the server and generators take either.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tiktoken

from grok1.tokenizer import TokenizerError

PAD, SEPARATOR, EOS = "<|pad|>", "<|separator|>", "<|eos|>"
# the special texts SGLang encodes as specials (its DEFAULT_SPECIAL_TOKENS, controls, reserved)
SGLANG_ALLOWED_SPECIAL = frozenset([PAD, SEPARATOR, EOS]
                                   + [f"<|control{i}|>" for i in range(1, 705)]
                                   + [f"<|reserved_{i}|>" for i in range(3, 128)])
# word_split "V1": tiktoken's default split with each digit on its own (SGLang's PAT_STR_B)
PAT_STR_B = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
             r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
TOKENIZER_FILE = "tokenizer.tok.json"


class Grok2Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found (Grok-2 ships "
                                 f"{TOKENIZER_FILE}; pass --tokenizer PATH)")
        self.path = path
        try:
            spec = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not a JSON tokenizer file ({e})") from None
        if not isinstance(spec, dict):
            raise TokenizerError(f"{path}: expected a JSON object with regular_tokens, "
                                 "special_tokens and word_split")
        ranks = {bytes(b): i for b, i in _entries(spec, "regular_tokens", path)}
        specials = {_text(b, path): i for b, i in _entries(spec, "special_tokens", path)}
        split = spec.get("word_split")
        if split != "V1":
            raise TokenizerError(f"{path}: word_split={split!r}; only 'V1' is known (SPEC 5)")
        ids = sorted([*ranks.values(), *specials.values()])
        if len(set(ids)) != len(ids):
            raise TokenizerError(f"{path}: token ids repeat across regular_tokens and "
                                 "special_tokens")
        n_vocab = spec.get("vocab_size")
        if n_vocab is not None and (n_vocab != len(ids) or ids[-1] != n_vocab - 1):
            # tiktoken's explicit_n_vocab: every id below vocab_size used exactly once
            raise TokenizerError(f"{path}: vocab_size={n_vocab!r}, but the file has "
                                 f"{len(ranks)} regular + {len(specials)} special tokens with "
                                 f"ids up to {ids[-1]}")
        kwargs: dict[str, Any] = {"name": path.name, "pat_str": spec.get("pat_str", PAT_STR_B),
                                  "mergeable_ranks": ranks, "special_tokens": specials}
        if "vocab_size" in spec:
            kwargs["explicit_n_vocab"] = spec["vocab_size"]
        try:
            self._enc = tiktoken.Encoding(**kwargs)
        except (ValueError, AssertionError) as e:
            raise TokenizerError(f"{path}: tiktoken refuses the vocabulary (vocab_size="
                                 f"{spec.get('vocab_size')}, {len(ranks)} regular + "
                                 f"{len(specials)} special tokens): {e}") from None
        extra = {_text(b, path) for b in spec.get("default_allowed_special", [])}
        self._allowed = frozenset((SGLANG_ALLOWED_SPECIAL | extra) & specials.keys())
        self._specials = specials
        self._special_by_id = {i: t for t, i in specials.items()}
        if EOS not in specials:
            raise TokenizerError(f"{path}: no {EOS} among the special tokens; SGLang stops on it")

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def pad_id(self) -> int:
        return self._specials.get(PAD, -1)

    @property
    def eos_id(self) -> int:
        return self._specials[EOS]

    @property
    def bos_id(self) -> int:
        return -1  # Grok-2 has no BOS (SGLang: bos_token_id = None)

    @property
    def separator_id(self) -> int:
        """Ends every chat turn (chat_prompt): a chat reply stops on it as on eos."""
        return self._specials.get(SEPARATOR, -1)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokens that end a generation (unless ignore_eos): eos, and the separator that
        ends every turn of a chat-tuned model's reply (SPEC 5)."""
        return (self.eos_id,) + ((self.separator_id,) if self.separator_id >= 0 else ())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added; SGLang's special texts become special ids."""
        return self._enc.encode(text, allowed_special=self._allowed, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD (as the incremental
        detokenizer expects)."""
        return self._enc.decode(list(ids), errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        """The token's text: a special's own text, else its bytes as UTF-8 (U+FFFD where a
        piece is part of a character)."""
        if token_id in self._special_by_id:
            return self._special_by_id[token_id]
        return self._enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def require_vocab(self, vocab_size: int) -> None:
        """Refuse a model whose vocabulary differs from ours (see grok1.tokenizer)."""
        if self.vocab_size != vocab_size:
            raise TokenizerError(f"tokenizer {self.path} has {self.vocab_size} tokens but the "
                                 f"model's vocab_size is {vocab_size}; wrong --tokenizer?")


def _entries(spec: dict, field: str, path: Path) -> list[tuple[list[int], int]]:
    items = spec.get(field)
    if not isinstance(items, list):
        raise TokenizerError(f"{path}: {field} missing or not a list (SPEC 5)")
    out = []
    for k, item in enumerate(items):
        ok = isinstance(item, dict) and isinstance(item.get("token"), int) and isinstance(
            item.get("bytes"), list) and all(isinstance(b, int) and 0 <= b < 256
                                             for b in item["bytes"])
        if not ok:
            raise TokenizerError(f"{path}: {field}[{k}]={str(item)[:80]}: expected "
                                 '{"bytes": [0-255, ...], "token": id}')
        out.append((item["bytes"], item["token"]))
    return out


def _text(byte_values: list[int], path: Path) -> str:
    try:
        return bytes(byte_values).decode()
    except UnicodeDecodeError:
        raise TokenizerError(f"{path}: special token bytes {byte_values[:16]} are not UTF-8 "
                             "text") from None


# ---- chat template -------------------------------------------------------------------------

_ROLES = {"user": "Human", "system": "System", "developer": "System", "assistant": "Assistant"}


def chat_prompt(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Grok-2's chat template (SGLang's and vLLM's, SPEC 5) for OpenAI-style messages:
    `Human: {text}<|separator|>\\n\\n` per user turn (text stripped), `System: ...` likewise,
    `Assistant: {text}<|separator|>\\n\\n` (not stripped), then `Assistant:` to generate.

    `content` is a string or OpenAI's list of parts ({"type": "text", "text": ...}, joined).
    "developer" (OpenAI's newer name for system) is written as System, as grok1's server does
    for Grok-1; the template has no other roles, and SGLang's drops them silently, so other
    roles raise ValueError naming the message.
    """
    out = []
    for k, m in enumerate(messages):
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{k}].role={role!r}: Grok-2's chat template has user, "
                             "system (developer) and assistant turns")
        text = _content_text(m.get("content"), k)
        if role != "assistant":
            text = text.strip()
        out.append(f"{_ROLES[role]}: {text}{SEPARATOR}\n\n")
    if add_generation_prompt:
        out.append("Assistant:")
    return "".join(out)


def _content_text(content: Any, k: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"messages[{k}].content: a string or a list of text parts expected")
