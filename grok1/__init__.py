"""grok1: xAI's Grok-1 in PyTorch, faithful to the JAX reference.

    import grok1
    folder = grok1.default_model_dir()                 # the embedded model; or "checkpoints"
    model = grok1.load(folder, device="cpu")
    llm = grok1.LLM(model, grok1.Tokenizer(folder / "tokenizer.model"))
    outs = llm.generate(["ROMEO:"], grok1.SamplingParams(max_tokens=64, temperature=0.8))

Importing this package imports nothing heavy: each public name is resolved on first use
(module `__getattr__`), so `grok1 --help` and `grok1 info` answer without loading torch.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "ConfigError": "grok1.config",
    "GrokConfig": "grok1.config",
    "LLM": "grok1.engine.llm",
    "SamplingParams": "grok1.sampling",
    "Tokenizer": "grok1.tokenizer",
    "TokenizerError": "grok1.tokenizer",
    "CheckpointError": "grok1.checkpoint",
    "default_model_dir": "grok1.assets",
    "load": "grok1.loading",  # the one way to build a model from weights
    "random_weights": "grok1.loading",  # ... or from random ones (benchmarks, tests)
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'grok1' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
