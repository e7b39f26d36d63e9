"""grok1: xAI's Grok-1 in PyTorch, faithful to the JAX reference."""

from grok1.config import ConfigError, GrokConfig

__all__ = ["ConfigError", "GrokConfig"]
