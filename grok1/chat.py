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
    return "\n".join(f"{CHAT_ROLES[role]}: {text}" for role, text in messages)


def chat_prompt_text(messages: Iterable[tuple[str, str]]) -> str:
    """The transcript with an open assistant turn: what the model continues."""
    return transcript(messages) + "\nAssistant:"
