"""`import grok1`: light to import, every public name reachable from the package."""

import subprocess
import sys

import grok1


def test_importing_grok1_does_not_import_torch():
    code = "import sys, grok1; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_resolve_to_their_modules():
    from grok1.config import GrokConfig
    from grok1.engine.llm import LLM
    from grok1.sampling import SamplingParams
    from grok1.tokenizer import Tokenizer

    assert (grok1.GrokConfig, grok1.LLM, grok1.SamplingParams, grok1.Tokenizer) == (
        GrokConfig, LLM, SamplingParams, Tokenizer)
    assert set(grok1.__all__) <= set(dir(grok1))
    assert all(getattr(grok1, name) is not None for name in grok1.__all__)

