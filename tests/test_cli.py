"""The `grok1` command as a user runs it."""

import subprocess
import sys


def grok1(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grok1", *args], capture_output=True, text=True,
                          timeout=120, check=False)  # tests read the exit status


def test_generate_with_no_model_argument_uses_the_embedded_shakespeare_model():
    out = grok1("generate", "ROMEO:", "--max-tokens", "40", "--seed", "0")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("ROMEO:") and len(text) > 60
    words = text.split()
    assert sum(w.strip(".,;:!?'").isalpha() for w in words) / len(words) > 0.8  # words, not noise


def test_engine_and_plain_paths_write_the_same_greedy_text():
    args = ("generate", "JULIET:", "--max-tokens", "30", "--temperature", "0")
    engine, plain = grok1(*args, "--engine", "on"), grok1(*args, "--engine", "off")
    assert engine.returncode == plain.returncode == 0, engine.stderr + plain.stderr
    assert engine.stdout == plain.stdout


def test_a_tokenizer_of_another_vocabulary_is_refused(golden_dir, tokenizer_path):
    out = grok1("generate", "hi", "--checkpoint", str(golden_dir / "checkpoint"), "--config",
                str(golden_dir / "config.json"), "--tokenizer", str(tokenizer_path))
    assert out.returncode != 0
    assert "131072 pieces but the model's vocab_size is 1024" in out.stderr
