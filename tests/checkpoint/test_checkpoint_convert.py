"""The streaming converter and the sharded grok1 format (grok1.checkpoint.convert): the release
-> int8 native round trip, resume after an interruption, corrupt sources, int4/fp8 outputs."""

import json
import shutil

import pytest
import torch

import grok1
from grok1.checkpoint import CheckpointError
from grok1.checkpoint.convert import (
    INDEX_FILE,
    STATE_FILE,
    convert,
    is_sharded_native,
    load_sharded_native,
    sha256_file,
)
from grok1.golden import load_cases
from grok1.quant import QUANT_GROUPS, dequantize, int4, quantize

SMALL_SHARDS = 1 << 20  # the golden's 7 MB in 7 shards


@pytest.fixture(scope="module")
def golden_release(golden_dir):
    return golden_dir / "checkpoint", golden_dir / "config.json"


@pytest.fixture(scope="module")
def int8_folder(golden_release, tmp_path_factory):
    ckpt, config = golden_release
    return convert(ckpt, tmp_path_factory.mktemp("conv") / "int8", "int8", config=config,
                   shard_bytes=SMALL_SHARDS, progress=False)


def _state_bytes(model):
    return {k: t.contiguous().view(torch.uint8) if t.dtype.itemsize == 1 else t
            for k, t in model.state_dict().items()}


def test_int8_conversion_loads_to_the_releases_tensors_and_logits(golden_dir, golden_release,
                                                                  int8_folder):
    index = json.loads((int8_folder / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
    assert sorted(p.name for p in int8_folder.iterdir()) == sorted(
        files + ["config.json", INDEX_FILE])
    meta = index["metadata"]
    assert meta["weights"] == "int8" and meta["grok1_format"] == "1"
    assert meta["sha256"] == {f: sha256_file(int8_folder / f) for f in files}
    assert meta["total_size"] == sum((int8_folder / f).stat().st_size for f in files) - sum(
        8 + int.from_bytes((int8_folder / f).read_bytes()[:8], "little") for f in files)
    assert is_sharded_native(int8_folder) and not is_sharded_native(golden_release[0])

    release = grok1.load(golden_release[0], config=golden_release[1], progress=False)
    ours = load_sharded_native(int8_folder, verify=True)
    assert ours.quantized and ours.config == release.config
    a, b = _state_bytes(release), _state_bytes(ours)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    tokens = torch.tensor(load_cases(golden_dir)["full_tokens"][:1])  # 24 tokens, all layers
    with torch.no_grad():
        assert torch.equal(ours(tokens), release(tokens))


def test_the_front_door_reads_a_converted_folder_whole_and_per_rank(golden_release, int8_folder):
    """grok1.load detects the sharded folder; a rank's load equals slicing the whole model."""
    from grok1.loading import detect_format
    from grok1.parallel.tensor import shard_model_
    from grok1.sharding import Layout

    assert detect_format(int8_folder).name == "grok1-sharded"
    whole = grok1.load(int8_folder)
    for layout in (Layout(2, 1, moe="tp"), Layout(4, 3, moe="ep", unembed="dim")):
        rank = grok1.load(int8_folder, layout=layout)
        expected = shard_model_(grok1.load(int8_folder), layout)
        assert rank.layout == layout and rank.state_dict().keys() == expected.state_dict().keys()
        for k, t in rank.state_dict().items():
            assert torch.equal(t, expected.state_dict()[k]), (layout, k)
    assert whole.layout is None


def test_interrupted_conversion_resumes_to_the_same_bytes(golden_release, int8_folder, tmp_path):
    ckpt, config = golden_release
    dst = tmp_path / "resumed"

    class Killed(Exception):
        pass

    def kill_after_three(done):
        if done == 3:
            raise Killed

    with pytest.raises(Killed):
        convert(ckpt, dst, "int8", config=config, shard_bytes=SMALL_SHARDS, progress=False,
                after_shard=kill_after_three)
    work = tmp_path / ".resumed.partial"
    assert not dst.exists()
    assert sorted(p.name for p in work.iterdir()) == [
        STATE_FILE, "model-00001-of-00007.safetensors", "model-00002-of-00007.safetensors",
        "model-00003-of-00007.safetensors"]
    # a damaged finished shard and a half-written one are both written again
    shard2 = work / "model-00002-of-00007.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:-1] + b"\x00")
    (work / "model-00004-of-00007.safetensors.partial").write_bytes(b"half")
    kept = (work / "model-00001-of-00007.safetensors").stat().st_mtime_ns
    seen = []
    convert(ckpt, dst, "int8", config=config, shard_bytes=SMALL_SHARDS, progress=False,
            after_shard=seen.append)
    # shards 1 and 3 kept; 2 and 4-7 written, each call counting the shards done so far
    assert seen == [3, 4, 5, 6, 7]
    assert (dst / "model-00001-of-00007.safetensors").stat().st_mtime_ns == kept
    assert not work.exists()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in int8_folder.iterdir())
    for p in int8_folder.iterdir():
        assert (dst / p.name).read_bytes() == p.read_bytes(), p.name


def test_resume_with_other_settings_is_refused(golden_release, tmp_path):
    ckpt, config = golden_release

    def stop(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, tmp_path / "x", "int8", config=config, shard_bytes=SMALL_SHARDS,
                progress=False, after_shard=stop)
    with pytest.raises(CheckpointError, match=r"\.x\.partial: an interrupted conversion with "
                                              r"other settings \(shard_bytes, shards, weights\)"):
        convert(ckpt, tmp_path / "x", "fp8", config=config, progress=False)


def test_truncated_release_file_is_refused_naming_it(golden_release, tmp_path):
    ckpt, config = golden_release
    bad = tmp_path / "ckpt-0"
    shutil.copytree(ckpt / "ckpt-0", bad)
    victim = bad / "tensor00004_000"  # layer 0's moe.w_up
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path, tmp_path / "out", "int4", config=config, progress=False)
    assert "ckpt-0/tensor00004_000 (layers.0.moe.w_up)" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_corrupt_shard_of_a_sharded_source_is_refused_naming_it(int8_folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(int8_folder, src)
    shard = src / "model-00005-of-00007.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"^src/model-00005-of-00007.safetensors: sha256 "
                                              r"\w+\.\.\. does not match the index's"):
        convert(src, tmp_path / "out", "int4", progress=False)
    with pytest.raises(CheckpointError, match="src/model-00005-of-00007.safetensors: sha256"):
        load_sharded_native(src, verify=True)


@pytest.mark.parametrize("weights,group_size", [("int4", 128), ("int4", 64), ("fp8", 128)])
def test_int4_and_fp8_conversions_hold_the_requantized_release(int8_folder, tmp_path, weights,
                                                               group_size):
    out = convert(int8_folder, tmp_path / weights, weights, group_size=group_size,
                  shard_bytes=SMALL_SHARDS, progress=False)
    meta = json.loads((out / INDEX_FILE).read_text())["metadata"]
    assert meta["weights"] == weights
    assert meta["group_size"] == (str(group_size) if weights == "int4" else "")
    model = load_sharded_native(out)
    ref = load_sharded_native(int8_folder)
    assert model.weights.name == weights
    # golden widths: D = 64 -> one int4 group (of 64); F = 344 -> 3 groups of 128 (the last of
    # 88) or 6 of 64 (the last of 24)
    d_groups, f_groups = 1, -(-344 // group_size)
    lin = model.layers[3].moe
    if weights == "int4":
        assert model.weights == int4(group_size)
        assert lin.w_gate.weight.shape == (8, 32, 344) and lin.w_gate.scales.shape[1] == d_groups
        assert lin.w_down.weight.shape == (8, 172, 64) and lin.w_down.scales.shape[1] == f_groups
    else:
        assert lin.w_down.weight.dtype == torch.float8_e4m3fn
        assert lin.w_down.scales.shape == (8, 1, 64)
    bound = 0.12 if weights == "int4" else 0.03  # 4-bit: ~0.1; e4m3: ~0.02 relative L2
    for name in ("attn.wq", "attn.wo", "moe.w_gate", "moe.w_down"):
        ours = model.layers[3].get_submodule(name).dense().float()
        theirs = ref.layers[3].get_submodule(name).dense().float()
        assert (ours - theirs).norm() / theirs.norm() < bound, name
    for key in ("embed", "norm.scale", "layers.3.moe.router", "layers.3.attn_norm.scale"):
        assert torch.equal(model.state_dict()[key], ref.state_dict()[key]), key


def test_dense_native_folder_converts_to_int8_by_the_release_rule(tmp_path):
    from grok1.assets import default_model_dir

    out = convert(default_model_dir(), tmp_path / "d8", "int8", progress=False)
    dense = grok1.load(default_model_dir())
    model = load_sharded_native(out)
    assert model.quantized and (out / "tokenizer.model").is_file()
    for name, groups in QUANT_GROUPS.items():
        q, s = quantize(dense.layers[1].get_submodule(name).weight, groups)
        lin = model.layers[1].get_submodule(name)
        assert torch.equal(lin.weight, q) and torch.equal(lin.scales, s), name
        assert torch.equal(lin.dense(), dequantize(q, s))


def test_grok1_convert_command_writes_what_the_library_writes(golden_release, int8_folder,
                                                               tmp_path, capsys):
    from grok1.cli import main

    ckpt, config = golden_release
    main(["convert", str(ckpt), str(tmp_path / "cli"), "--config", str(config)])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'cli'}"
    ours = _state_bytes(grok1.load(tmp_path / "cli"))
    theirs = _state_bytes(grok1.load(int8_folder))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_conversion_killed_by_sigkill_resumes_to_the_same_bytes(golden_release, int8_folder,
                                                                  tmp_path):
    """A real kill (SIGKILL: no cleanup runs) after 2 of 7 shards, then the same call again."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    ckpt, config = golden_release
    dst = tmp_path / "killed"
    repo = Path(__file__).resolve().parents[2]
    child = (f"import time\nfrom grok1.checkpoint.convert import convert\n"
             f"convert({str(ckpt)!r}, {str(dst)!r}, 'int8', config={str(config)!r}, "
             f"shard_bytes={SMALL_SHARDS}, progress=False, "
             "after_shard=lambda n: time.sleep(0.5))\n")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=repo,
                            env=dict(os.environ, PYTHONPATH=str(repo)))
    state = tmp_path / ".killed.partial" / STATE_FILE
    deadline = time.monotonic() + 120
    try:
        while not (state.is_file() and len(json.loads(state.read_text())["done"]) >= 2):
            assert proc.poll() is None, "the conversion ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not dst.exists()
    assert len(json.loads(state.read_text())["done"]) in (2, 3)
    seen = []
    convert(ckpt, dst, "int8", config=config, shard_bytes=SMALL_SHARDS, progress=False,
            after_shard=seen.append)
    assert seen and seen[-1] == 7 and len(seen) <= 5  # the finished shards were kept
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in int8_folder.iterdir())
    for p in int8_folder.iterdir():
        assert (dst / p.name).read_bytes() == p.read_bytes(), p.name
