"""The release checkpoint loader: file order, exact tensors, and the errors for bad files."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from helpers_ckpt import QuantizedWeight8bit, read_xai_file, to_torch, write_xai_file

import grok1
from grok1.checkpoint import CheckpointError, UnsafePickleError
from grok1.checkpoint.names import (
    from_xai_name,
    to_xai_name,
    xai_file_name,
    xai_num_files,
    xai_parameter_order,
)
from grok1.checkpoint.xai_pickle import iter_xai_tensors, load_xai_checkpoint, scan_xai_file
from grok1.config import GrokConfig
from grok1.model import Grok1
from grok1.quant import dequantize

# SPEC section 4: base file index (j = 0) of each layer of the 64-layer release.
SPEC_BASE_INDEX = """
0:2 1:14 2:146 3:278 4:410 5:542 6:674 7:734 8:746 9:758 10:26 11:38 12:50 13:62 14:74 15:86
16:98 17:110 18:122 19:134 20:158 21:170 22:182 23:194 24:206 25:218 26:230 27:242 28:254 29:266
30:290 31:302 32:314 33:326 34:338 35:350 36:362 37:374 38:386 39:398 40:422 41:434 42:446 43:458
44:470 45:482 46:494 47:506 48:518 49:530 50:554 51:566 52:578 53:590 54:602 55:614 56:626 57:638
58:650 59:662 60:686 61:698 62:710 63:722
"""
# Golden checkpoint (11 layers, string order 0, 1, 10, 2, ...): the files of layer 0.
W_GATE_0, W_DOWN_0, WK_0, WO_0, MOE_NORM_0 = 2, 3, 5, 6, 11


@pytest.fixture(scope="module")
def golden_config(golden_dir):
    return GrokConfig.from_json(golden_dir / "config.json")


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    return grok1.load(golden_dir / "checkpoint", config=golden_dir / "config.json",
                      progress=False)


@pytest.fixture
def ckpt(golden_dir, tmp_path):
    """A private copy of the golden checkpoint (7 MB) to damage; returns its ckpt-0 folder."""
    shutil.copytree(golden_dir / "checkpoint", tmp_path / "checkpoint")
    return tmp_path / "checkpoint" / "ckpt-0"


def load_copy(ckpt, golden_dir):
    return grok1.load(ckpt.parent, config=golden_dir / "config.json", progress=False)


# ---- names and file order ----------------------------------------------------------------------

def test_file_order_matches_the_golden_parameter_order(golden_dir, golden_config):
    expected = json.loads((golden_dir / "config.json").read_text())["parameter_order"]
    entries = xai_parameter_order(golden_config.num_layers)
    assert [e.xai_name for e in entries] == expected
    assert [e.file_index for e in entries] == list(range(len(expected)))
    assert sorted(p.name for p in (golden_dir / "checkpoint" / "ckpt-0").iterdir()) == \
        [xai_file_name(i) for i in range(xai_num_files(golden_config.num_layers))]


def test_file_order_of_the_64_layer_release_matches_spec():
    entries = xai_parameter_order(64)
    assert len(entries) == 770 and xai_file_name(769) == "tensor00769_000"
    base = {int(k): int(v) for k, v in (p.split(":") for p in SPEC_BASE_INDEX.split())}
    for layer, index in base.items():
        assert entries[index].xai_name == f"transformer/decoder_layer_{layer}/moe/linear/w"
        assert entries[index].grok1_name == f"layers.{layer}.moe.w_gate"
    assert entries[13].xai_name == "transformer/decoder_layer_0/router/w"
    assert entries[769].xai_name == "transformer/decoder_layer_9/router/w"
    assert entries[769].grok1_name == "layers.9.moe.router"
    assert entries[0].grok1_name == "embed" and entries[1].grok1_name == "norm.scale"


def test_name_maps_are_inverse_and_cover_every_model_parameter():
    config = GrokConfig.preset("tiny").replace(num_layers=12)
    with torch.device("meta"):
        model = Grok1(config, quantized=True)
    names = {e.grok1_name for e in xai_parameter_order(config.num_layers)}
    keys = {k.removesuffix(".weight").removesuffix(".scales") for k in model.state_dict()}
    assert names == keys
    for e in xai_parameter_order(config.num_layers):
        assert from_xai_name(e.xai_name) == e.grok1_name
        assert to_xai_name(e.grok1_name) == e.xai_name
    with pytest.raises(KeyError):
        from_xai_name("transformer/decoder_layer_0/mlp/w")


# ---- loading the golden checkpoint -------------------------------------------------------------

def test_golden_checkpoint_loads_bit_exact_through_the_public_api(golden_model, golden_dir,
                                                                  golden_config):
    state = golden_model.state_dict()
    ckpt = golden_dir / "checkpoint" / "ckpt-0"
    seen = set()
    for e in xai_parameter_order(golden_config.num_layers):
        value = read_xai_file(ckpt / xai_file_name(e.file_index))
        if isinstance(value, QuantizedWeight8bit):
            for part in ("weight", "scales"):
                ours = state[f"{e.grok1_name}.{part}"]
                ref = to_torch(getattr(value, part))
                assert ours.dtype == ref.dtype and torch.equal(ours, ref), e.grok1_name
                seen.add(f"{e.grok1_name}.{part}")
        else:
            ref = to_torch(value)
            assert ref.dtype == torch.float32
            ours = state[e.grok1_name]
            if e.grok1_name == "embed":  # bf16(f32 table), as the reference uses it (SPEC 2.1)
                ref = ref.to(torch.bfloat16)
            assert ours.dtype == ref.dtype and torch.equal(ours, ref), e.grok1_name
            seen.add(e.grok1_name)
    assert seen == set(state)
    assert not golden_model.training
    assert not any(p.requires_grad for p in golden_model.parameters())
    assert golden_model.layers[0].attn.wq.weight.dtype == torch.int8


def test_load_accepts_the_ckpt0_folder_itself(golden_model, golden_dir):
    model = grok1.load(golden_dir / "checkpoint" / "ckpt-0", config=golden_dir / "config.json",
                       progress=False)
    ours, ref = model.state_dict(), golden_model.state_dict()
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_iter_xai_tensors_yields_stored_tensors_in_file_order(golden_dir, golden_config):
    items = list(iter_xai_tensors(golden_dir / "checkpoint", golden_config))
    keys = [k for k, _ in items]
    assert keys[:4] == ["embed", "norm.scale", "layers.0.moe.w_gate.weight",
                        "layers.0.moe.w_gate.scales"]
    assert keys[-1] == "layers.9.moe.router"
    embed = dict(items)["embed"]
    ref = read_xai_file(golden_dir / "checkpoint" / "ckpt-0" / xai_file_name(0))
    assert embed.dtype == torch.float32 and torch.equal(embed, to_torch(ref))


def test_dense_model_gets_the_dequantized_matrices(golden_dir, golden_config, golden_model):
    with torch.device("meta"):
        dense = Grok1(golden_config, quantized=False, dtype=torch.float32)
    dense = load_xai_checkpoint(golden_dir / "checkpoint", golden_config, model=dense,
                                progress=False)
    q = golden_model.layers[3].moe.w_down
    assert dense.layers[3].moe.w_down.weight.dtype == torch.float32
    assert torch.equal(dense.layers[3].moe.w_down.weight, dequantize(q.weight, q.scales).float())
    assert dense.embed.dtype == torch.float32  # the file's f32 table, kept at the model's dtype
    assert torch.equal(dense.embed.to(torch.bfloat16), golden_model.embed)


def test_shard_fn_gets_file_tensors_and_its_pieces_are_placed(golden_dir, golden_config,
                                                              golden_model):
    with torch.device("meta"):
        model = Grok1(golden_config, quantized=True)
    wq = model.layers[4].attn.wq  # this "rank" keeps the first 3 of 16 query heads
    wq.weight, wq.scales = wq.weight[:, :48], wq.scales[:, :48]
    calls = []

    def shard_fn(key, t):
        calls.append((key, t.dtype, t.device.type))
        return t[:, :48] if key.startswith("layers.4.attn.wq.") else t

    model = load_xai_checkpoint(golden_dir / "checkpoint", golden_config, model=model,
                                shard_fn=shard_fn, workers=1, progress=False)
    ref = golden_model.layers[4].attn.wq
    assert torch.equal(model.layers[4].attn.wq.weight, ref.weight[:, :48])
    assert torch.equal(model.layers[4].attn.wq.scales, ref.scales[:, :48])
    keys = [k for k, _, _ in calls]
    assert keys.index("layers.4.attn.wq.weight") + 1 == keys.index("layers.4.attn.wq.scales")
    assert {k: d for k, d, _ in calls}["embed"] == torch.float32  # as stored, pre-cast
    assert {dev for _, _, dev in calls} == {"cpu"}
    assert len(keys) == len(golden_model.state_dict())


def test_shard_fn_with_a_wrong_shape_names_the_key(golden_dir, golden_config):
    def shard_fn(key, t):
        return t[:-1] if key == "layers.2.moe.router" else t

    with pytest.raises(CheckpointError, match=r"\(layers\.2\.moe\.router\): layers\.2\.moe\.router "
                       r"has shape \(63, 8\) after shard_fn, the model expects \(64, 8\)"):
        load_xai_checkpoint(golden_dir / "checkpoint", golden_config, shard_fn=shard_fn,
                            progress=False)


def test_file_rewritten_by_numpy_2_loads_the_same(ckpt, golden_dir, golden_model):
    # numpy >= 2 writes numpy._core.multiarray._reconstruct; the release was numpy 1.26's
    path = ckpt / xai_file_name(W_DOWN_0)
    write_xai_file(path, read_xai_file(path))
    assert b"numpy._core" in path.read_bytes()
    model = load_copy(ckpt, golden_dir)
    assert torch.equal(model.layers[0].moe.w_down.weight, golden_model.layers[0].moe.w_down.weight)
    assert torch.equal(model.layers[0].moe.w_down.scales, golden_model.layers[0].moe.w_down.scales)


# ---- refusing pickles that would run code ------------------------------------------------------

class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_pickle_that_would_run_a_command_is_refused_and_runs_nothing(ckpt, golden_dir, tmp_path):
    marker = tmp_path / "pwned"
    (ckpt / xai_file_name(W_DOWN_0)).write_bytes(pickle.dumps(_System(f"touch {marker}"), 4))
    with pytest.raises(UnsafePickleError) as e:
        load_copy(ckpt, golden_dir)
    assert str(e.value) == ("ckpt-0/tensor00003_000 (layers.0.moe.w_down) asks for "
                            f"{os.system.__module__}.system; allowed: numpy arrays, "
                            "ml_dtypes.bfloat16, __main__.QuantizedWeight8bit")
    assert not marker.exists()


@pytest.mark.parametrize("payload, message", [
    (b"cbuiltins\neval\n(Vprint(1)\ntR.", "asks for builtins.eval"),  # protocol 0 GLOBAL
    (pickle.dumps(_Call(np.zeros(1).__reduce__()[0], (np.dtype, (0,), b"b")), 4),
     "calls numpy.core.multiarray._reconstruct with (numpy.dtype, (0,), b'b')"),
    (pickle.dumps(_Call(np.dtype, ("f4", True, True)), 2), "calls numpy.dtype with ('f4', True"),
    (b"\x80\x04\x8c\x08__main__\x8c\x13QuantizedWeight8bit\x93\x8c\x01x\x85\x81.",
     "creates __main__.QuantizedWeight8bit with ('x',)"),
    (b"\x80\x04K\x01\x94K\x02Q.", "uses pickle opcode BINPERSID at byte 7"),
])
def test_pickles_outside_the_numpy_allow_list_are_refused(ckpt, golden_dir, payload, message):
    (ckpt / xai_file_name(WO_0)).write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="^ckpt-0/tensor00006_000 \\(layers.0.attn.wo\\) "
                       + message.replace("(", "\\(").replace(")", "\\)")):
        load_copy(ckpt, golden_dir)


# ---- damaged, missing and mismatched files -----------------------------------------------------

def test_truncated_tensor_data_error_names_file_parameter_and_sizes(ckpt, golden_dir):
    path = ckpt / xai_file_name(W_GATE_0)  # 8 x 64 x 344 int8 = 176,128 bytes of weight
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"^ckpt-0/tensor00002_000 \(layers\.0\.moe\."
                       r"w_gate\): truncated: 99\.8 kB of 176\.1 kB of tensor data present; "
                       r"fetch the file again$"):
        load_copy(ckpt, golden_dir)


def test_truncated_pickle_header_error_names_the_file(ckpt, golden_dir):
    path = ckpt / xai_file_name(MOE_NORM_0)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(CheckpointError, match=r"^ckpt-0/tensor00011_000 \(layers\.0\.moe_norm\."
                       r"scale\): truncated: the pickle stops at byte 60 before its end"):
        load_copy(ckpt, golden_dir)


def test_missing_file_error_names_file_parameter_and_count(ckpt, golden_dir):
    (ckpt / xai_file_name(WO_0)).unlink()
    with pytest.raises(CheckpointError) as e:
        load_copy(ckpt, golden_dir)
    assert str(e.value) == ("ckpt-0/tensor00006_000 (layers.0.attn.wo) missing; "
                            "expected 134 files for 11 layers")


def test_wrong_config_reports_the_files_it_expected(golden_dir):
    with pytest.raises(CheckpointError, match=r"^ckpt-0/tensor00134_000 \(layers\.19\.moe\."
                       r"w_gate\) missing; expected 770 files for 64 layers; 636 files missing "
                       r"in all$"):
        grok1.load(golden_dir / "checkpoint")  # the grok-1 preset


def test_more_files_than_the_config_implies_is_an_error(ckpt, golden_dir):
    shutil.copyfile(ckpt / xai_file_name(0), ckpt / xai_file_name(134))
    with pytest.raises(CheckpointError, match=r"^ckpt-0 has 135 tensor files \(tensor00134_000 "
                       r"and 0 more unexpected\), but the config's 11 layers imply 134; wrong "
                       r"config\?$"):
        load_copy(ckpt, golden_dir)


def test_wrong_shape_error_names_file_parameter_and_both_shapes(ckpt, golden_dir):
    path = ckpt / xai_file_name(W_DOWN_0)
    value = read_xai_file(path)  # weight (8, 344, 64), scales (8, 8, 64)
    write_xai_file(path, QuantizedWeight8bit(value.weight[..., :63].copy(),
                                             value.scales[..., :63].copy()))
    with pytest.raises(CheckpointError) as e:
        load_copy(ckpt, golden_dir)
    assert str(e.value) == ("ckpt-0/tensor00003_000 (layers.0.moe.w_down): weight shape "
                            "(8, 344, 64) expected, file has (8, 344, 63)")


def test_wrong_dtype_error_names_file_parameter_and_both_dtypes(ckpt, golden_dir):
    path = ckpt / xai_file_name(MOE_NORM_0)
    write_xai_file(path, read_xai_file(path).astype(np.float64))
    with pytest.raises(CheckpointError) as e:
        load_copy(ckpt, golden_dir)
    assert str(e.value) == ("ckpt-0/tensor00011_000 (layers.0.moe_norm.scale): dtype float32 "
                            "expected, file has float64")


def test_plain_array_where_a_quantized_weight_belongs_is_an_error(ckpt, golden_dir):
    rng = np.random.default_rng(5)
    write_xai_file(ckpt / xai_file_name(WK_0), rng.standard_normal((64, 128), dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"^ckpt-0/tensor00005_000 \(layers\.0\.attn\.wk\): "
                       r"QuantizedWeight8bit \(int8 weight \+ bf16 scales\) expected, file has a "
                       r"float32 array \(64, 128\)$"):
        load_copy(ckpt, golden_dir)


def test_array_data_shorter_than_its_shape_is_an_error(ckpt, golden_dir):
    path = ckpt / xai_file_name(MOE_NORM_0)  # f32 (64,): 256 bytes, stored inline
    data = path.read_bytes()
    i = data.index(b"B\x00\x01\x00\x00")  # BINBYTES of length 256
    path.write_bytes(data[:i] + b"B\xfc\x00\x00\x00" + data[i + 5:i + 5 + 252] + data[i + 5 + 256:])
    with pytest.raises(CheckpointError, match=r"^ckpt-0/tensor00011_000 \(layers\.0\.moe_norm\."
                       r"scale\): array \(64,\) float32 needs 256 bytes, the file has 252$"):
        load_copy(ckpt, golden_dir)


@pytest.mark.parametrize("index", [MOE_NORM_0, WK_0])
def test_corrupted_files_fail_with_checkpoint_errors_only(golden_dir, tmp_path, index):
    """Random byte damage to the pickle's opcodes gives a CheckpointError (or, where it only
    hits data, a valid file), never another exception, a hang or a call."""
    data = (golden_dir / "checkpoint" / "ckpt-0" / xai_file_name(index)).read_bytes()
    rng = np.random.default_rng(index)
    path, outcomes = tmp_path / "damaged", set()
    for _ in range(150):
        damaged = bytearray(data)
        for i in rng.integers(0, 240, size=rng.integers(1, 4)):  # the opcodes before the data
            damaged[i] = rng.integers(0, 256)
        path.write_bytes(damaged)
        try:
            outcomes.add(type(scan_xai_file(path)).__name__)
        except CheckpointError as e:
            outcomes.add(type(e).__name__)
    assert "CheckpointError" in outcomes and "UnsafePickleError" in outcomes


def test_a_folder_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint grok1 reads; expected a grok1 "
                                              "folder"):
        grok1.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        grok1.load(tmp_path / "absent")
