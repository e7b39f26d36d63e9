"""The `grok1` command as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grok1.cli import main


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


# ---- start-up: help and `grok1 info` import neither torch nor the server stack -----------------

def modules_after(*args: str) -> set[str]:
    """The modules a fresh interpreter holds after running `grok1 ARGS` (help exits early)."""
    code = ("import sys\nfrom grok1.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint(' '.join(sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=120, check=True)
    return set(out.stderr.split("\n")[-2].split())


def test_help_and_info_do_not_import_torch_or_the_server():
    for args in (("--help",), ("info",), ("generate", "--help"), ("serve", "--help")):
        heavy = modules_after(*args) & {"torch", "fastapi", "uvicorn", "sentencepiece"}
        assert not heavy, f"grok1 {' '.join(args)} imported {sorted(heavy)}"


# ---- help texts state defaults ---------------------------------------------------------------

def help_text(*args: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_speaks_to_users_with_examples(capsys):
    text = help_text(capsys=capsys)
    assert "Each subcommand's work lives in its layer" not in text
    assert 'grok1 generate "ROMEO:"' in text and "grok1 COMMAND --help" in text


def test_generate_help_states_its_sampling_defaults_and_the_servers(capsys):
    text = " ".join(help_text("generate", capsys=capsys).split())  # argparse wraps lines
    assert "tokens to generate per prompt (fewer if EOS comes first) (default: 100)" in text
    assert "0 = greedy (default: 0.8)" in text
    assert "temperature 1.0, max_tokens 16 on /v1/completions" in text


def test_serve_help_states_the_port_and_openais_sampling_defaults(capsys):
    text = " ".join(help_text("serve", capsys=capsys).split())
    assert "TCP port to listen on (default: 8000)" in text
    assert "temperature 1.0, max_tokens 16 on /v1/completions" in text
    assert "`grok1 generate` defaults to temperature 0.8 and 100 tokens" in text


def test_the_engine_bench_script_explains_its_positional_and_layers():
    # the benchmark lives in bench/ (no `grok1 bench`): it runs from a checkout
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "bench/engine_bench.py", "--help"], cwd=repo,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    text = " ".join(out.split())
    assert "{all,decode,prefill} what to measure: decode steps, prefill, or both" in text
    assert "full-width layers (random weights) (default: 4)" in text
    assert "--model {grok-1,grok-2}" in text
    assert "--weights {int8,int4,fp8,bf16}" in text


def test_engine_bench_rooflines_count_the_formats_stored_bytes():
    """Decode reads packed int4 (K/2 bytes per column) and its bf16 scales per 128 inputs:
    about half int8's bytes; fp8 as many as int8 (one scale per column instead of 1 or 8)."""
    from bench.engine_bench import bench_config, tensor_bytes
    from grok1.model import Grok1

    config = bench_config(1)
    with torch.device("meta"):
        per = {w: tensor_bytes(Grok1(config, weights=w)) for w in ("int8", "int4", "fp8")}
    D, F = config.emb_size, config.ffn_size
    gate_or_up = D // 2 * F + D // 128 * F * 2  # uint8 [D/2, F], bf16 scales [D/128, F]
    down = F // 2 * D + F // 128 * D * 2
    assert per["int4"]["expert"] == 2 * gate_or_up + down
    assert 0.5 < per["int4"]["expert"] / per["int8"]["expert"] < 0.52
    assert abs(per["fp8"]["expert"] / per["int8"]["expert"] - 1) < 1e-3


def test_the_server_samples_with_the_defaults_its_help_states():
    from grok1.assets import default_model_dir
    from grok1.server import protocol
    from grok1.server.serving import OpenAIServing
    from grok1.tokenizer import Tokenizer

    tokenizer = Tokenizer(default_model_dir() / "tokenizer.model")
    serving = OpenAIServing(tokenizer, "m", max_model_len=512, vocab_size=tokenizer.vocab_size,
                            max_n=1, max_choices=1)
    completion = serving.plan_completion("r", protocol.CompletionRequest(model="m", prompt="hi"))
    chat = serving.plan_chat("c", protocol.ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}]))
    (completion_sub,), (chat_sub,) = completion.subs, chat.subs
    assert (completion_sub.params.temperature, completion_sub.params.max_tokens) == (1.0, 16)
    assert chat_sub.params.max_tokens == 512 - len(chat_sub.prompt_ids)  # the rest of the context


# ---- errors: one line naming the problem and the next step, status 2 for wrong arguments -------

def error_line(*args: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_says_cuda_is_not_available(capsys):
    assert error_line("generate", "--device", "cuda", "x", capsys=capsys) == (
        f"grok1 generate: error: --device cuda: CUDA is not available (torch "
        f"{torch.__version__} is a CPU-only build); use --device cpu, or run on a GPU machine "
        "with torch's CUDA build")


def test_a_device_name_torch_does_not_know_is_refused(capsys):
    assert error_line("generate", "--device", "gpu", "x", capsys=capsys) == (
        "grok1 generate: error: --device gpu: not a device name; use cpu, cuda or cuda:N")


def test_a_missing_checkpoint_folder_is_named_before_the_tokenizer(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    assert error_line("generate", "--checkpoint", str(missing), "x", capsys=capsys) == (
        f"grok1 generate: error: --checkpoint {missing}: no such folder; give the folder "
        "holding the release's ckpt-0/ or a grok1 folder (config.json + model.safetensors), "
        "or leave --checkpoint out for the embedded model")


def test_a_missing_config_file_is_named(capsys, tmp_path):
    missing = tmp_path / "config.json"
    assert error_line("info", "--config", str(missing), capsys=capsys) == (
        f"grok1 info: error: --config {missing}: no such file; check the path, or leave "
        "--config out for the default")
