"""grok1's own checkpoint folder: exact round trips, atomic saves, and name/shape errors."""

import json

import pytest
import torch
from conftest import assert_same_state
from safetensors.torch import load_file

import grok1
from grok1 import random_weights
from grok1.checkpoint import CheckpointError
from grok1.checkpoint.native import load_native, save_native, write_safetensors


def test_quantized_model_round_trips_exactly(tiny_config, tmp_path):
    model = random_weights(tiny_config, seed=1)
    tokenizer = tmp_path / "sp.model"
    tokenizer.write_bytes(torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(2),
                                        dtype=torch.uint8).numpy().tobytes())
    out = save_native(model, tmp_path / "m", tokenizer_path=tokenizer)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    loaded = load_native(out)
    assert loaded.config == tiny_config and loaded.quantized
    assert loaded.layers[1].moe.w_down.scales.shape == (8, 8, tiny_config.emb_size)
    assert_same_state(loaded, model)


def test_dense_model_round_trips_exactly_and_converts_on_request(tiny_config, tmp_path):
    model = random_weights(tiny_config, quantized=False, seed=3)  # bf16 matrices, f32 norms
    save_native(model, tmp_path / "m")
    loaded = load_native(tmp_path / "m")
    assert not loaded.quantized
    assert_same_state(loaded, model)
    wide = load_native(tmp_path / "m", dtype=torch.float32)
    assert wide.layers[0].attn.wq.weight.dtype == torch.float32
    assert torch.equal(wide.layers[0].attn.wq.weight, model.layers[0].attn.wq.weight.float())


def test_public_load_reads_a_native_folder_in_eval_mode(tiny_config, tmp_path):
    model = random_weights(tiny_config, seed=4)
    save_native(model, tmp_path / "m")
    loaded = grok1.load(tmp_path / "m")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert_same_state(loaded, model)
    tokens = torch.randint(1, tiny_config.vocab_size, (2, 7),
                           generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_release_checkpoint_converts_to_native_unchanged(golden_dir, tmp_path):
    release = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json",
                         progress=False)
    save_native(release, tmp_path / "golden")
    assert_same_state(grok1.load(tmp_path / "golden"), release)


def test_file_is_standard_safetensors_with_grok1_metadata(tiny_config, tmp_path):
    model = random_weights(tiny_config, seed=6)
    save_native(model, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + n])
    assert header["__metadata__"] == {"format": "pt", "grok1_format": "1", "quantized": "true"}
    assert header["layers.0.attn.wo.weight"]["dtype"] == "I8"
    theirs = load_file(path)  # safetensors' own reader
    assert theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())


def test_save_refuses_an_existing_folder_and_overwrite_replaces_it(tiny_config, tmp_path):
    first, second = random_weights(tiny_config, seed=7), random_weights(tiny_config, seed=8)
    save_native(first, tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"m exists; pass overwrite=True to replace it$"):
        save_native(second, tmp_path / "m")
    assert_same_state(load_native(tmp_path / "m"), first)
    save_native(second, tmp_path / "m", overwrite=True)
    assert_same_state(load_native(tmp_path / "m"), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left


def test_failed_save_leaves_nothing_behind(tiny_config, tmp_path):
    model = random_weights(tiny_config, seed=9)
    with pytest.raises(FileNotFoundError):
        save_native(model, tmp_path / "m", tokenizer_path=tmp_path / "absent.model")
    assert list(tmp_path.iterdir()) == []


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(path).items()}  # not views of the old file
    change(tensors)
    write_safetensors(path, tensors, {"format": "pt"})


def test_missing_and_unexpected_names_are_listed_with_counts(tiny_config, tmp_path):
    save_native(random_weights(tiny_config, seed=10), tmp_path / "m")

    def change(tensors):
        for i in range(tiny_config.num_layers):
            for k in [k for k in tensors if k.startswith(f"layers.{i}.attn.")]:
                del tensors[k]
        tensors["layers.0.attn.w_qkv.weight"] = torch.zeros(3, dtype=torch.int8)

    _rewrite(tmp_path / "m", change)
    with pytest.raises(CheckpointError) as e:
        load_native(tmp_path / "m")
    assert str(e.value) == (
        "m/model.safetensors does not match its config (2 layers, quantized): 16 missing: "
        "layers.0.attn.wq.weight, layers.0.attn.wq.scales, layers.0.attn.wk.weight, "
        "layers.0.attn.wk.scales, layers.0.attn.wv.weight, layers.0.attn.wv.scales, "
        "layers.0.attn.wo.weight, layers.0.attn.wo.scales, layers.1.attn.wq.weight, "
        "layers.1.attn.wq.scales, ...; 1 unexpected: layers.0.attn.w_qkv.weight")


def test_wrong_shape_and_dtype_name_the_tensor(tiny_config, tmp_path):
    save_native(random_weights(tiny_config, seed=11), tmp_path / "m")
    _rewrite(tmp_path / "m",
             lambda t: t.update({"layers.1.moe.router": t["layers.1.moe.router"][:, :7]}))
    with pytest.raises(CheckpointError, match=r"^m/model.safetensors: layers\.1\.moe\.router shape "
                       r"\(48, 8\) expected, file has \(48, 7\)$"):
        load_native(tmp_path / "m")
    _rewrite(tmp_path / "m", lambda t: t.update({"layers.1.moe.router": torch.zeros(48, 8),
                                                  "layers.0.attn.wo.weight":
                                                  t["layers.0.attn.wo.weight"].float()}))
    with pytest.raises(CheckpointError, match=r"^m/model.safetensors: layers\.0\.attn\.wo\.weight "
                       r"dtype torch\.int8 expected, file has F32$"):
        load_native(tmp_path / "m")
