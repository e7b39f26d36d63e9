"""`import grok1`: light to import, every public name reachable from the package."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

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



@pytest.mark.slow  # two 64-token completions through the engine on the CPU
def test_the_readme_python_snippet_runs_as_written(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    names: dict = {}
    exec(compile(snippet, "README.md", "exec"), names)
    assert names["logits"].shape == (1, len(names["tokens"][0]), 2048)  # the embedded vocabulary
    first, second = names["outs"]
    assert first.text and second.text and capsys.readouterr().out == first.text + "\n"
