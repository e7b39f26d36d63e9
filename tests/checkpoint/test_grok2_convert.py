"""`grok1 convert` of a Grok-2 release folder (the golden's, experts pre-sharded 8 ways): bf16
conversion holds the release's tensors bit for bit and loads to the same logits; int8 holds the
release's attention and expert matrices quantized by the release's rule (the dense MLP, head and
embedding bf16 as they were); the index names the family, so the tokenizer and chat template
follow the converted folder."""

import copy

import numpy as np
import pytest
import torch
from grok2_reference import GOLDEN2
from grok2_tokenizer_file import golden_release_folder

import grok1
from grok1.checkpoint.convert import convert, read_index
from grok1.loading import detect_format, load_tokenizer, model_family
from grok1.parallel.tensor import shard_model_
from grok1.quant import QUANT_GROUPS, dequantize, quantize
from grok1.sharding import Layout
from grok1.tokenizer_grok2 import TOKENIZER_FILE, Grok2Tokenizer


@pytest.fixture(scope="module")
def release(tmp_path_factory, golden2_dir):
    """The golden's files (linked) with a tokenizer.tok.json beside them."""
    return golden_release_folder(tmp_path_factory.mktemp("g2") / "grok-2", golden2_dir)


@pytest.fixture(scope="module")
def whole(release):
    return grok1.load(release, progress=False)


@pytest.fixture(scope="module")
def tokens():
    return torch.from_numpy(np.load(GOLDEN2 / "golden.npz")["tokens"][:2, :16].copy())


def test_bf16_conversion_holds_the_release_and_gives_its_logits(release, whole, tokens,
                                                                tmp_path):
    out = convert(release, tmp_path / "bf16", None, shard_bytes=1 << 20, progress=False)
    index = read_index(out)
    assert index["metadata"]["family"] == "grok-2" and index["metadata"]["weights"] == "bf16"
    assert len(set(index["weight_map"].values())) > 1  # several shards of at most 1 MiB
    assert detect_format(out).name == "grok1-sharded"
    converted = grok1.load(out, progress=False)
    assert converted.config == whole.config
    ref, got = whole.state_dict(), converted.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    with torch.no_grad():
        assert torch.equal(converted(tokens), whole(tokens))
    # the family follows the folder: Grok-2's tokenizer (copied) and chat template
    assert type(load_tokenizer(out)) is Grok2Tokenizer and (out / TOKENIZER_FILE).is_file()
    assert model_family(out).chat_template == "grok-2"


def test_int8_conversion_quantizes_attention_and_experts_only(release, whole, tokens, tmp_path):
    out = convert(release, tmp_path / "int8", "int8", progress=False)
    model = grok1.load(out, progress=False)
    assert model.layers[0].attn.wq.quantized and model.layers[0].moe.w_down.quantized
    ref, got = whole.state_dict(), model.state_dict()
    for i in range(whole.config.num_layers):
        for name in ("attn.wq", "attn.wo", "moe.w_gate", "moe.w_down"):
            key = f"layers.{i}.{name}"
            w, s = quantize(ref[f"{key}.weight"], QUANT_GROUPS[name])  # the release's rule
            assert torch.equal(got[f"{key}.weight"], w) and torch.equal(got[f"{key}.scales"], s)
            # int8 with per-column scales: within half a step (scale / 2) of the bf16 value
            err = (dequantize(w, s).float() - ref[f"{key}.weight"].float()).abs()
            assert err.max() <= s.float().max() / 2 + 1e-3, key
    for key in ("embed", "lm_head.weight", "layers.2.mlp.w_down.weight", "layers.1.moe.router",
                "norm.scale"):
        assert torch.equal(got[key], ref[key]), key
    with torch.no_grad():
        a, b = model(tokens).double(), whole(tokens).double()
    # int8 rounding of every attention and expert weight, through this random model's peaked
    # attention and routing (built to amplify; golden README): measured rel 0.0725; a matrix
    # converted wrong (transposed, mis-scaled) moves the logits by ~100 %
    assert ((a - b).norm() / b.norm()).item() < 0.15
    # a rank reads its slices of the converted folder (scale groups with their rows)
    layout = Layout(2, 1)
    rank = grok1.load(out, layout=layout, progress=False).state_dict()
    sliced = shard_model_(copy.deepcopy(model), layout).state_dict()
    assert rank.keys() == sliced.keys() and all(torch.equal(rank[k], sliced[k]) for k in rank)
    assert rank["lm_head.weight"].shape == (128, 512)


def test_a_grok1_config_for_a_grok2_folder_is_refused(release, tmp_path):
    from grok1.config import ConfigError, GrokConfig

    with pytest.raises(ConfigError, match="takes its own config.json"):
        convert(release, tmp_path / "x", None, config=GrokConfig.preset("tiny"), progress=False)
