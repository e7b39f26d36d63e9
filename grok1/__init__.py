"""grok1: xAI's Grok-1 in PyTorch, faithful to the JAX reference.

Importing this package is cheap: `load` and `GrokConfig` are what most code needs; the engine's
`LLM` and the sampling parameters are re-exported lazily (they pull in more modules).
"""

from grok1.config import ConfigError, GrokConfig
from grok1.sampling import SamplingParams

__all__ = ["LLM", "ConfigError", "GrokConfig", "SamplingParams", "load"]


def load(checkpoint_dir, config=None, device="cpu"):
    """The Grok1 model in `checkpoint_dir` (see grok1.checkpoint.load)."""
    from grok1.checkpoint import load as load_checkpoint

    return load_checkpoint(checkpoint_dir, config=config, device=device)


def __getattr__(name: str):
    if name == "LLM":
        from grok1.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'grok1' has no attribute {name!r}")
