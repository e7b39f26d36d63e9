"""The chat transcript a base model reads (Grok-1 has no chat template): one line per message,
`Role: text`, roles System (also "developer"), User and Assistant. `grok1 serve` ends a prompt
with an open `Assistant:` turn and stops the reply at CHAT_STOPS; `grok1 finetune` trains on
whole transcripts. Pure text, no torch."""

from __future__ import annotations

from collections.abc import Iterable

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ["\nUser:", "\nSystem:"]


def transcript(messages: Iterable[tuple[str, str]]) -> str:
    """The lines of (role, text) messages; KeyError for a role outside CHAT_ROLES."""
    return transcript_spans(messages)[0]


def transcript_spans(messages: Iterable[tuple[str, str]]
                     ) -> tuple[str, list[tuple[str, int, int]]]:
    """The transcript and, per message, (role, start, end): its text's characters, from the
    space after `Role:` (the tokenizer joins it to the first word) to its last character."""
    text, spans = "", []
    for role, content in messages:
        if text:
            text += "\n"
        text += f"{CHAT_ROLES[role]}:"
        start = len(text)
        text += f" {content}"
        spans.append((role, start, len(text)))
    return text, spans


def chat_prompt_text(messages: Iterable[tuple[str, str]]) -> str:
    """The transcript with an open assistant turn: what the model continues."""
    return transcript(messages) + "\nAssistant:"
