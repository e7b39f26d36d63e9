"""Grok-2's release layout (grok1.checkpoint.grok2): any TP size from the 8-way pre-shards, each
rank reading only its files; one-line errors naming file, tensor, expected and found."""

import shutil
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from grok1.checkpoint import grok2
from grok1.checkpoint.names import CheckpointError
from grok1.checkpoint.slices import TensorSlice
from grok1.config_grok2 import Grok2Config


@pytest.fixture(scope="module")
def golden2_config(golden2_dir) -> Grok2Config:
    return Grok2Config.from_json(golden2_dir / "config.json")


@pytest.fixture(scope="module")
def golden2_full(golden2_dir, golden2_config) -> dict[str, torch.Tensor]:
    return dict(grok2.read(golden2_dir, golden2_config))


def test_golden_folder_is_detected(golden2_dir, tmp_path):
    assert grok2.detect(golden2_dir)
    assert not grok2.detect(tmp_path)


def test_full_read_matches_the_files_transposed(golden2_dir, golden2_config, golden2_full):
    """Independent check with safetensors' own loader: each grok1 tensor is the SGLang tensor
    transposed (experts: stacked, pre-shards concatenated along the expert width)."""
    files = {}
    for p in sorted(golden2_dir.glob("*.safetensors")):
        files.setdefault("common" if "common" in p.name else "shards", []).append(p)
    common = {}
    for p in files["common"]:
        common.update(safetensors.torch.load_file(p))
    torch.testing.assert_close(golden2_full["embed"], common["model.embed_tokens.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(golden2_full["lm_head.weight"], common["lm_head.weight"].T,
                               rtol=0, atol=0)
    torch.testing.assert_close(golden2_full["layers.2.attn.wk.weight"],
                               common["model.layers.2.self_attn.k_proj.weight"].T, rtol=0, atol=0)
    torch.testing.assert_close(golden2_full["layers.3.moe.router"],
                               common["model.layers.3.block_sparse_moe.gate.weight"].T,
                               rtol=0, atol=0)
    torch.testing.assert_close(golden2_full["layers.1.mlp.w_down.weight"],
                               common["model.layers.1.mlp.down_proj.weight"].T, rtol=0, atol=0)
    shards = [safetensors.torch.load_file(golden2_dir / f"pytorch_model-00007-TP-{r:03d}.safetensors")
              for r in range(8)]
    w2 = torch.cat([s["model.layers.1.block_sparse_moe.experts.5.w2.weight"] for s in shards], 1)
    torch.testing.assert_close(golden2_full["layers.1.moe.w_down.weight"][5], w2.T, rtol=0, atol=0)
    assert golden2_full["layers.0.moe.w_gate.weight"].shape == (8, 128, 256)
    assert all(t.is_contiguous() and t.dtype == torch.bfloat16 for t in golden2_full.values())
    assert len(golden2_full) == 3 + 4 * 15


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_tp_ranks_concatenate_to_the_full_tensors(golden2_dir, golden2_config, golden2_full,
                                                  tp_size):
    c = golden2_config
    ranks = [dict(grok2.read(golden2_dir, c, grok2.tp_want(c, r, tp_size))) for r in range(tp_size)]
    for s in grok2.tp_want(c, 0, tp_size):
        pieces = [ranks[r][s.name] for r in range(tp_size)]
        if s.dim is None:  # replicated
            assert all(torch.equal(p, golden2_full[s.name]) for p in pieces)
            continue
        if s.name.endswith(("wk.weight", "wv.weight")) and tp_size > c.num_kv_heads:
            # 2 kv heads on 4 or 8 ranks: each rank holds the kv head its query heads read
            share = tp_size // c.num_kv_heads
            pieces = pieces[::share]
        torch.testing.assert_close(torch.cat(pieces, s.dim), golden2_full[s.name], rtol=0, atol=0)


def test_each_rank_opens_only_its_own_expert_files(golden2_dir, golden2_config, monkeypatch):
    opened = []
    real = grok2.safe_open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    want = grok2.tp_want(golden2_config, 3, 8)
    scanned = grok2.scan(golden2_dir, golden2_config)  # the scan reads headers of every file
    monkeypatch.setattr(grok2, "scan", lambda *a: scanned)
    monkeypatch.setattr(grok2, "safe_open", spy)
    out = dict(grok2.read(golden2_dir, golden2_config, want))
    tp_files = {n for n in opened if "TP-common" not in n}
    assert tp_files == {f"pytorch_model-0000{k}-TP-003.safetensors" for k in (6, 7, 8)}
    assert out["layers.0.moe.w_up.weight"].shape == (8, 128, 32)


def test_slices_along_experts_model_dim_and_partial_shards(golden2_dir, golden2_config, golden2_full):
    want = [TensorSlice("layers.2.moe.w_gate.weight", 0, 3, 5),  # experts 3 and 4
            TensorSlice("layers.2.moe.w_gate.weight", 2, 20, 75),  # across pre-shards 0..2
            TensorSlice("layers.2.moe.w_down.weight", 2, 7, 9),  # the model dim of w2
            TensorSlice("layers.2.attn.wo.weight", 0, 16, 48),
            TensorSlice("embed", 0, 100, 200), "norm.scale"]
    out = list(grok2.read(golden2_dir, golden2_config, want))
    full = golden2_full
    expect = [full["layers.2.moe.w_gate.weight"][3:5], full["layers.2.moe.w_gate.weight"][:, :, 20:75],
              full["layers.2.moe.w_down.weight"][:, :, 7:9], full["layers.2.attn.wo.weight"][16:48],
              full["embed"][100:200], full["norm.scale"]]
    for (name, got), exp in zip(out, expect, strict=True):
        torch.testing.assert_close(got, exp, rtol=0, atol=0, msg=name)


def test_bad_want_entries_are_refused(golden2_dir, golden2_config):
    with pytest.raises(ValueError, match="'layers.9.attn.wq.weight' is not a tensor"):
        list(grok2.read(golden2_dir, golden2_config, ["layers.9.attn.wq.weight"]))
    with pytest.raises(ValueError, match="range 0:999 is not a non-empty range of dim 1"):
        list(grok2.read(golden2_dir, golden2_config, [TensorSlice("embed", 1, 0, 999)]))
    with pytest.raises(ValueError, match="--tp 3 must divide num_kv_heads=2"):
        grok2.tp_want(golden2_config, 0, 3)


# ---- synthetic folders: errors --------------------------------------------------------------

SMALL = Grok2Config(vocab_size=32, emb_size=16, key_size=4, num_q_heads=4, num_kv_heads=2,
                    num_layers=2, num_experts=4, num_selected_experts=2, expert_width=8,
                    dense_width=24, sequence_len=64)


def write_release(folder: Path, config: Grok2Config, n_shards: int = 4, seed: int = 0) -> None:
    """A release-layout folder for `config` from random bf16 tensors: one file per parameter
    kind as the release (SPEC 4), experts in `n_shards` pre-shards."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = grok2._expected_file_shapes(config)
    kinds: dict[str, dict[str, torch.Tensor]] = {}
    shards: dict[str, list[dict[str, torch.Tensor]]] = {}
    for name, (shape, width_dim) in shapes.items():
        t = torch.randn(shape, generator=gen).to(torch.bfloat16)
        kind = name.split(".weight")[0].split(".")[-1] if "layers" in name else name
        if width_dim is None:
            kinds.setdefault(kind, {})[name] = t
        else:
            per = shards.setdefault(kind, [{} for _ in range(n_shards)])
            for r, piece in enumerate(t.chunk(n_shards, dim=width_dim)):
                per[r][name] = piece.contiguous()
    number = 0
    for tensors in kinds.values():
        save_file(tensors, folder / f"pytorch_model-{number:05d}-TP-common.safetensors")
        number += 1
    for per in shards.values():
        for r, tensors in enumerate(per):
            save_file(tensors, folder / f"pytorch_model-{number:05d}-TP-{r:03d}.safetensors")
        number += 1


@pytest.fixture
def small_release(tmp_path) -> Path:
    folder = tmp_path / "grok-2"
    write_release(folder, SMALL)
    return folder


def test_synthetic_release_with_4_preshards_reads_at_tp_1_and_2(small_release):
    full = dict(grok2.read(small_release, SMALL))
    assert full["layers.1.moe.w_down.weight"].shape == (4, 8, 16)
    halves = [dict(grok2.read(small_release, SMALL, grok2.tp_want(SMALL, r, 2))) for r in (0, 1)]
    for name in ("layers.1.moe.w_up.weight", "layers.0.mlp.w_gate.weight", "layers.1.attn.wq.weight"):
        torch.testing.assert_close(torch.cat([h[name] for h in halves], -1), full[name],
                                   rtol=0, atol=0)


def test_missing_preshard_file_is_named(small_release):
    victim = min(small_release.glob("*-TP-002.safetensors"))
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"grok-2/{victim.name} missing: its siblings "
                                              "hold 4 pre-shards"):
        grok2.scan(small_release, SMALL)


def test_truncated_file_error_names_the_file(small_release):
    victim = small_release / "pytorch_model-00002-TP-common.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"grok-2/pytorch_model-00002-TP-common.safetensors:"
                                              r" not a readable safetensors file .*truncated\?"):
        grok2.scan(small_release, SMALL)


def test_missing_and_unexpected_tensors_are_listed(small_release):
    path = small_release / "pytorch_model-00000-TP-common.safetensors"
    tensors = safetensors.torch.load_file(path)
    (_name, t), = tensors.items()
    save_file({"model.embed_tokenz.weight": t}, path)
    with pytest.raises(CheckpointError) as e:
        grok2.scan(small_release, SMALL)
    assert "1 missing: model.embed_tokens.weight; 1 unexpected: model.embed_tokenz.weight" \
        in str(e.value)
    assert "(2 layers, 4 experts, dense MLP)" in str(e.value)


def test_wrong_shape_names_file_tensor_expected_and_found(small_release):
    common = sorted(small_release.glob("*-TP-common.safetensors"))
    for path in common:
        tensors = safetensors.torch.load_file(path)
        if "model.layers.1.self_attn.q_proj.weight" in tensors:
            tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(16, 15,
                                                                            dtype=torch.bfloat16)
            save_file(tensors, path)
            break
    with pytest.raises(CheckpointError, match=rf"grok-2/{path.name} \(model.layers.1.self_attn."
                                              r"q_proj.weight\): shape \(16, 16\) expected, file "
                                              r"has \(16, 15\)"):
        grok2.scan(small_release, SMALL)


def test_wrong_preshard_shape_and_dtype(small_release):
    path = min(small_release.glob("*-TP-001.safetensors"))
    tensors = safetensors.torch.load_file(path)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name][:1].contiguous()}, path)
    with pytest.raises(CheckpointError, match=rf"{path.name} \({name}\): pre-shard 1 of 4: shape"):
        grok2.scan(small_release, SMALL)
    save_file({**tensors, name: tensors[name].float()}, path)
    with pytest.raises(CheckpointError, match=r"dtype BF16 expected \(config torch_dtype="
                                              r"bfloat16\), file has F32"):
        grok2.scan(small_release, SMALL)


def test_a_config_with_other_sizes_is_refused_before_reading(small_release):
    with pytest.raises(CheckpointError, match=r"does not hold the model its config describes "
                                              r"\(3 layers"):
        list(grok2.read(small_release, SMALL.replace(num_layers=3)))


def test_duplicated_tensor_is_refused(small_release):
    src = small_release / "pytorch_model-00002-TP-common.safetensors"
    shutil.copy(src, small_release / "pytorch_model-00099-TP-common.safetensors")
    with pytest.raises(CheckpointError, match=r"pytorch_model-00099-TP-common.safetensors: "
                                              r"model.norm.weight is also in"):
        grok2.scan(small_release, SMALL)
