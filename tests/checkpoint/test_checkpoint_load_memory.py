"""What loading a release checkpoint costs in memory and how it reads: peak RSS of a child
process against the loaded model's bytes (issue 15: <= 1.1x), the int8 weights held as the
file's private map, and the f32 embedding converted span by span with exact values."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_ckpt import read_xai_file, to_torch, write_release_checkpoint

import grok1
import grok1.loading  # torch and the loaders: the baseline, before any tensor is read
from grok1.checkpoint import xai_pickle
from grok1.checkpoint.names import xai_file_name
from grok1.config import GrokConfig

REPO = Path(__file__).resolve().parents[2]

# An f32 embedding of 512 MB (bf16 in the model: 256 MB) and 1 MoE layer of 8 experts of
# 2048 x 4096 int8 (192 MB): the embedding dominates, as in a 1-layer Grok-1.
BIG = GrokConfig.preset("debug").replace(
    vocab_size=65536, emb_size=2048, key_size=128, num_q_heads=16, num_kv_heads=8,
    num_layers=1, widening_factor=3.0)

_CHILD = """
import json, sys
import grok1
import grok1.loading  # torch and the loaders: the baseline, before any tensor is read

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

baseline = status("VmRSS")
model = grok1.load(sys.argv[1], config=sys.argv[2], progress=False)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"),
                  "model": sum(t.numel() * t.element_size() for t in model.state_dict().values())}))
"""


@pytest.fixture(scope="module")
def big_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    write_release_checkpoint(folder, BIG, seed=1)
    return folder


def test_peak_rss_of_a_load_stays_within_a_tenth_of_the_model(big_release):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(big_release),
                          str(big_release / "config.json")], capture_output=True, text=True,
                         check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""},
                         timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["model"] > 400e6  # bf16 embedding 256 MB + int8 matrices 192 MB + attention
    # Beyond the interpreter, torch and grok1 (`baseline`), the load may hold the model plus
    # 10 % and each reader thread's staging buffer (8 threads x _SPAN_BYTES = 128 MB). The
    # load before issue 15 held the f32 table beside its bf16 copy: ~2.1x above the baseline.
    allowed = 1.1 * r["model"] + 8 * xai_pickle._SPAN_BYTES
    assert r["peak"] - r["baseline"] <= allowed, (r, allowed)


def test_spans_convert_the_embedding_exactly_and_int8_stays_mapped(big_release, monkeypatch):
    # spans of 1 MB: the 512 MB table in 512 spans over 8 threads, each span's rows bf16(f32)
    monkeypatch.setattr(xai_pickle, "_SPAN_BYTES", 1 << 20)
    model = grok1.load(big_release, config=BIG, progress=False)
    ckpt = big_release / "ckpt-0"
    embed = to_torch(read_xai_file(ckpt / xai_file_name(0)))
    assert model.embed.dtype == torch.bfloat16 and torch.equal(model.embed, embed.bfloat16())
    w_up = read_xai_file(ckpt / xai_file_name(4))  # layers.0.moe.w_up
    moe = model.layers[0].moe
    assert torch.equal(moe.w_up.weight, to_torch(w_up.weight))
    assert torch.equal(moe.w_up.scales, to_torch(w_up.scales))
    # the int8 weight is the file's map (copy-on-write): writing to it leaves the file alone
    moe.w_up.weight[0, 0, 0] ^= 1
    assert torch.equal(to_torch(read_xai_file(ckpt / xai_file_name(4)).weight),
                       to_torch(w_up.weight))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, BIG.vocab_size, (1, 5)))).all()


def test_a_file_truncated_after_the_scan_is_named(big_release, tmp_path, monkeypatch):
    """The scan checks sizes first; a file cut between the scan and the read is still named."""
    import shutil

    ckpt = tmp_path / "ckpt-0"
    shutil.copytree(big_release / "ckpt-0", ckpt)
    scan = xai_pickle.scan_xai_checkpoint
    victims = {0: "embed", 3: "layers.0.moe.w_down"}  # converted; mapped

    def scan_then_truncate(*args, **kwargs):
        scanned = scan(*args, **kwargs)
        for index in victims:
            path = ckpt / xai_file_name(index)
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
        return scanned

    monkeypatch.setattr(xai_pickle, "scan_xai_checkpoint", scan_then_truncate)
    with pytest.raises(grok1.checkpoint.CheckpointError) as e:
        grok1.load(tmp_path, config=BIG, progress=False)
    assert "truncated" in str(e.value) and "\n" not in str(e.value)
    assert any(f"ckpt-0/{xai_file_name(i)} ({name})" in str(e.value)
               for i, name in victims.items()), str(e.value)


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds t's data in this process (/proc/self/maps), else None."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= addr < hi:
            return Path(rest[4]).name if len(rest) > 4 and rest[4].startswith("/") else None
    return None


def test_whole_and_contiguous_rank_pieces_stay_mapped_and_columns_are_copied(golden_dir):
    from grok1.sharding import Layout

    ckpt, config = golden_dir / "checkpoint", golden_dir / "config.json"
    whole = grok1.load(ckpt, config=config, progress=False)
    rank = grok1.load(ckpt, config=config, layout=Layout(2, 1, moe="ep"), progress=False)
    # golden layer 0 (string order 0, 1, 10, ...): w_down in file 3, wq in 7, wo in 6
    assert _mapped_file(whole.layers[0].moe.w_down.weight) == xai_file_name(3)
    assert _mapped_file(whole.layers[0].attn.wq.weight) == xai_file_name(7)
    assert _mapped_file(whole.embed) is None  # converted to bf16: the model's own memory
    assert _mapped_file(rank.layers[0].moe.w_down.weight) == xai_file_name(3)  # experts 4-7
    assert _mapped_file(rank.layers[0].attn.wo.weight) == xai_file_name(6)  # rows
    assert _mapped_file(rank.layers[0].attn.wq.weight) is None  # columns: a copy
    for name in ("moe.w_down", "attn.wo", "attn.wq"):
        a, b = rank.layers[0].get_submodule(name), whole.layers[0].get_submodule(name)
        assert a.weight.is_contiguous()
        assert torch.equal(a.dense(), shard_piece(b, name))


def shard_piece(lin, name: str) -> torch.Tensor:
    """The dequantized slice rank 1 of 2 holds (Layout(2, 1, moe="ep")) of a whole Linear."""
    w = lin.dense() if name != "moe.w_down" else torch.stack([lin.dense(e) for e in range(8)])
    if name == "moe.w_down":
        return w[4:]
    half = w.shape[-1 if name == "attn.wq" else -2] // 2
    return w[:, half:] if name == "attn.wq" else w[half:]
