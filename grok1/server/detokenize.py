"""Incremental detokenization and stop strings for streamed completions.

SentencePiece byte-fallback pieces (`<0xF0>`) carry one byte each, so a character can arrive over
several tokens; decoding a prefix then ends in U+FFFD. Text is emitted only once it ends on a full
character. Each step decodes a short window (the last emitted piece plus the new tokens) and
subtracts the window's old text: the tokenizer's leading-space rule touches only the window's first
piece, which both decodes share, so " world" after "Hello" keeps its space.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
MAX_UTF8_TAIL = 3  # an incomplete UTF-8 character is at most 3 bytes (one U+FFFD each at most)
CONTEXT_TOKENS = 4  # prompt tokens kept as decode context for the first generated piece


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def _trailing_replacements(text: str) -> int:
    return len(text) - len(text.rstrip(REPLACEMENT))


class IncrementalDetokenizer:
    """Text of a growing token sequence, handed out in pieces that never split a character."""

    def __init__(self, tokenizer: TokenizerLike, context_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)[-CONTEXT_TOKENS:]
        self.prefix_offset = 0  # window start: the decode context
        self.read_offset = len(self.ids)  # tokens before this are emitted as text

    def push(self, new_ids: list[int], *, final: bool = False) -> str:
        """Append tokens; return the newly complete text ('' while a character is still partial,
        unless `final`, which flushes whatever bytes there are)."""
        self.ids.extend(new_ids)
        if self.read_offset == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        old = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if not final and 0 < _trailing_replacements(full) <= MAX_UTF8_TAIL:
            return ""  # a character split over byte pieces: wait for its last byte
        if not full.startswith(old):  # a tokenizer that rewrites earlier text: resync
            old = old[:len(full)] if full.startswith(old[:len(full)]) else ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(old):]


def token_text(tokenizer: TokenizerLike, context_ids: list[int], token_id: int) -> str:
    """The text one token adds after `context_ids` (for logprobs' token strings)."""
    ctx = list(context_ids[-CONTEXT_TOKENS:])
    before = tokenizer.decode(ctx)
    after = tokenizer.decode(ctx + [token_id])
    return after[len(before):] if after.startswith(before) else tokenizer.decode([token_id])


class StopTextStream:
    """Generated text with stop strings applied: text is emitted unless it could be the start of
    a stop string; the first stop string found truncates the output there (OpenAI semantics:
    the stop string itself is not returned, unless include_stop: vLLM's
    include_stop_str_in_output)."""

    def __init__(self, tokenizer: TokenizerLike, context_ids: list[int], stops: list[str],
                 include_stop: bool = False):
        self.detok = IncrementalDetokenizer(tokenizer, context_ids)
        self.stops = stops
        self.include_stop = include_stop
        self.max_stop = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, new_ids: list[int], *, final: bool = False) -> str:
        """Append tokens; return the text safe to send now. After a stop string is found,
        `stopped` is True and later calls return ''."""
        if self.stopped:
            return ""
        searched = max(0, len(self.text) - self.max_stop + 1)
        self.text += self.detok.push(new_ids, final=final)
        if self.stops:
            hits = [(i, len(s)) for s in self.stops if (i := self.text.find(s, searched)) >= 0]
            if hits:
                at, length = min(hits)
                self.text = self.text[:at + length if self.include_stop else at]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._partial_stop_len()
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
