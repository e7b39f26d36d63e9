"""The front door: grok1.load recognises each source kind through loading.FORMATS and gives the
same model as the format's own reader; a rank's load and a rank's random_weights are exactly the
slices of the one-process model; grok1.random_weights is reproducible tensor by tensor."""

import copy

import pytest
import torch
from conftest import assert_same_state

import grok1
from grok1.checkpoint import CheckpointError, save_native
from grok1.checkpoint.xai_pickle import load_xai_checkpoint
from grok1.config import GrokConfig
from grok1.loading import FORMATS, Format, detect_format
from grok1.parallel.tensor import Layout, shard_model_

LAYOUTS = [Layout(2, 1), Layout(2, 0, moe="ep"), Layout(2, 1, unembed="dim"),
           Layout(4, 3, attn="none", moe="ep", unembed="none")]


def test_each_source_kind_is_detected(golden_dir, tmp_path):
    release = golden_dir / "checkpoint"
    assert detect_format(release).name == "xai-release"  # the folder holding ckpt-0/
    assert detect_format(release / "ckpt-0").name == "xai-release"  # ckpt-0 itself
    save_native(grok1.random_weights("tiny"), tmp_path / "native")
    assert detect_format(tmp_path / "native").name == "grok1"
    assert detect_format(grok1.default_model_dir()).name == "grok1"


def test_an_unknown_folder_is_one_line_naming_it_and_what_grok1_reads(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError) as e:
        grok1.load(tmp_path)
    assert str(e.value) == (
        f"{tmp_path}: not a checkpoint grok1 reads; expected a grok1 folder (model.safetensors + "
        "config.json), a Hugging Face Grok-1 port (hpcai-tech/grok-1 or keyfan/grok-1-hf), "
        "a converted grok1 folder (model.safetensors.index.json + "
        "model-*.safetensors), a Grok-2 release folder (pytorch_model-*-TP-common.safetensors) "
        "or a release checkpoint (ckpt-0/tensorNNNNN_000, or that folder)")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'weights.bin'}: no such checkpoint "
                                              "folder; expected a grok1 folder"):
        grok1.load(tmp_path / "weights.bin")


def test_a_new_format_is_one_table_entry(monkeypatch, tmp_path):
    """A format the table gains is read through the same door, sharded per request."""
    (tmp_path / "weights.fake").write_text("")
    seen = []

    def read(path, request):
        seen.append((path, request.config, request.layout))
        return request.empty_model(request.config, False, torch.float32).to_empty(device="cpu")

    fake = Format("fake", "a fake folder", lambda p: (p / "weights.fake").is_file(), read)
    monkeypatch.setattr("grok1.loading.FORMATS", (*FORMATS, fake))
    model = grok1.load(tmp_path, config="tiny", layout=Layout(2, 1))
    assert seen == [(tmp_path, GrokConfig.preset("tiny"), Layout(2, 1))]
    assert model.layers[0].attn.wq.weight.shape == (48, 24)  # the rank's 3 of 6 query heads
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_the_golden_through_the_front_door_gives_the_release_readers_logits(golden_dir):
    config = GrokConfig.from_json(golden_dir / "config.json")
    direct = load_xai_checkpoint(golden_dir / "checkpoint", config, progress=False)
    model = grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json",
                       progress=False)
    assert_same_state(model, direct)
    tokens = torch.randint(1, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), direct(tokens))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("quantized", [True, False])
def test_a_grok1_folder_read_for_one_rank_equals_slicing_the_whole(tmp_path, layout, quantized):
    whole = grok1.random_weights("tiny", quantized=quantized, seed=5)
    save_native(whole, tmp_path / "m")
    shard = grok1.load(tmp_path / "m", layout=layout)
    assert_same_state(shard, shard_model_(copy.deepcopy(whole), layout))
    assert shard.layers[0].attn.wq.weight.is_contiguous()  # copied out of the file's map


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("quantized", [True, False])
def test_random_weights_of_one_rank_are_the_slices_of_the_one_process_model(layout, quantized):
    whole = grok1.random_weights("tiny", quantized=quantized, seed=2)
    shard = grok1.random_weights("tiny", quantized=quantized, seed=2, layout=layout)
    assert_same_state(shard, shard_model_(copy.deepcopy(whole), layout))


def test_random_weights_are_drawn_tensor_by_tensor_from_the_seed():
    tiny = GrokConfig.preset("tiny")
    a = grok1.random_weights(tiny, seed=4).state_dict()
    deeper = grok1.random_weights(tiny.replace(num_layers=3), seed=4).state_dict()
    other = grok1.random_weights(tiny, seed=5).state_dict()
    assert all(torch.equal(a[k], deeper[k]) for k in a)  # other shapes do not move a tensor
    assert not torch.equal(a["embed"], other["embed"])
    w = a["layers.0.moe.w_down.weight"]
    assert w.dtype == torch.int8 and int(w.min()) == -127 and int(w.max()) == 127
    router = a["layers.0.moe.router"]  # std router_std / sqrt(emb_size): 0.5 / sqrt(48)
    assert abs(float(router.std()) - 0.5 / 48 ** 0.5) < 0.15 * 0.5 / 48 ** 0.5
    dense = grok1.random_weights(tiny, quantized=False, std=0.3).state_dict()
    assert abs(float(dense["layers.1.attn.wq.weight"].float().std()) - 0.3) < 0.03


def test_random_weights_in_int4_and_fp8_have_entries_of_about_std():
    from grok1.quant import FP8, int4

    tiny = GrokConfig.preset("tiny")
    assert_same_state(grok1.random_weights(tiny, seed=4, weights="int8"),
                      grok1.random_weights(tiny, seed=4))  # int8 draws as before
    for weights, fmt in (("int4", int4()), (int4(16), int4(16)), ("fp8", FP8)):
        model = grok1.random_weights(tiny, weights=weights, std=0.3)
        assert model.weights == fmt
        lin = model.layers[1].moe.w_up
        assert lin.weight.dtype == fmt.storage_dtype
        # uniform int4 codes of std 4.6 or normal fp8 of std 64, scales std * (0.5 .. 1.5) over
        # it: entries of std 0.3 * sqrt(13 / 12) = 0.31
        assert abs(float(lin.dense().float().std()) - 0.31) < 0.03
    with pytest.raises(ValueError, match=r"^random_weights: quantized=True contradicts "
                                         r"weights=fp8$"):
        grok1.random_weights(tiny, quantized=True, weights="fp8")
