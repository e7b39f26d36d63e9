"""The embedded default model: a 4M-parameter Grok-architecture model trained on Shakespeare
(scripts/train_default_model.sh), shipped so `grok1 generate "ROMEO:"` works offline."""

from __future__ import annotations

from pathlib import Path


def default_model_dir() -> Path:
    """The folder of the default model (grok1 native format: config.json, model.safetensors,
    tokenizer.model)."""
    return Path(__file__).resolve().parent / "default"


def model_dir_or_default(checkpoint: str | Path | None) -> Path:
    """The checkpoint folder the user named, else the default model's."""
    return Path(checkpoint) if checkpoint is not None else default_model_dir()
