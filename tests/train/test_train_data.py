"""grok1.train data, tokenizer training, LR schedule and router losses (CPU, fast)."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from grok1.train.data import DataError, TokenLoader, open_split, tokenize_files, write_dataset
from grok1.train.losses import expert_fractions, load_balancing_loss, z_loss
from grok1.train.tokenizer_train import TokenizerTrainError, train_tokenizer
from grok1.train.train_config import TrainConfig, get_lr

WORDS = ["thou", "art", "the", "king", "of", "night", "and", "day", "my", "lord", "what", "say", "you", "to", "this", "fair", "lady", "shall", "we", "go", "hence", "now", "good", "morrow", "sweet", "prince"]


def random_play(rng: random.Random, lines: int) -> str:
    """Seeded random 'verse': speaker lines and speeches, with line breaks and indentation."""
    out = []
    for _ in range(lines):
        out.append(rng.choice(["ROMEO:", "JULIET:", "NURSE:"]))
        for _ in range(rng.randint(1, 3)):
            indent = "  " if rng.random() < 0.3 else ""
            out.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))))
        out.append("")
    return "\n".join(out)


@pytest.fixture
def random_docs(tmp_path):
    rng = random.Random(7)
    vocab = 300
    docs = [(f"doc{i}", [rng.randrange(3, vocab) for _ in range(rng.randint(900, 1500))])
            for i in range(3)]
    write_dataset(tmp_path / "data", docs, vocab, val_fraction=0.2)
    return tmp_path / "data", docs, vocab


def test_write_dataset_splits_each_document_tail_into_val(random_docs):
    data_dir, docs, _ = random_docs
    train = np.concatenate([np.asarray(s) for s in open_split(data_dir, "train")])
    val = np.concatenate([np.asarray(s) for s in open_split(data_dir, "val")])
    cuts = [len(ids) - int(len(ids) * 0.2) for _, ids in docs]
    assert train.tolist() == [t for (_, ids), c in zip(docs, cuts) for t in ids[:c]]
    assert val.tolist() == [t for (_, ids), c in zip(docs, cuts) for t in ids[c:]]
    assert train.dtype == np.uint16


def test_truncated_shard_error_names_the_file(random_docs):
    data_dir, _, _ = random_docs
    shard = data_dir / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"train_000\.bin: .* bytes, meta.json says"):
        open_split(data_dir, "train")


def test_loader_batches_are_windows_of_the_data_shifted_by_one(random_docs):
    data_dir, _, _ = random_docs
    train = np.asarray(open_split(data_dir, "train")[0]).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(train, 17)  # every (input, target) span
    loader = TokenLoader(data_dir, "train", batch_size=3, seq_len=16, seed=5)
    for _ in range(2 * loader.batches_per_epoch + 1):  # across two epoch boundaries
        x, y = next(loader)
        assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
        assert all((windows == row).all(axis=1).any() for row in rows)


def test_loader_is_deterministic_and_resumes_exactly(random_docs):
    data_dir, _, _ = random_docs
    args = {"batch_size": 2, "seq_len": 16, "seed": 11}
    reference = TokenLoader(data_dir, "train", **args)
    expected = [next(reference)[0] for _ in range(3 * reference.batches_per_epoch)]
    first = TokenLoader(data_dir, "train", **args)
    for _ in range(reference.batches_per_epoch + 3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = TokenLoader(data_dir, "train", **args)
    resumed.load_state_dict(state)
    rest = [next(resumed)[0] for _ in range(len(expected) - reference.batches_per_epoch - 3)]
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[reference.batches_per_epoch + 3:]))
    other_seed = TokenLoader(data_dir, "train", batch_size=2, seq_len=16, seed=12)
    assert not torch.equal(next(other_seed)[0], expected[0])


def test_ranks_read_disjoint_slices_of_the_global_batch(random_docs):
    data_dir, _, _ = random_docs
    whole = TokenLoader(data_dir, "train", batch_size=4, seq_len=16, seed=3)
    ranks = [TokenLoader(data_dir, "train", batch_size=2, seq_len=16, seed=3, rank=r,
                         world_size=2) for r in range(2)]
    for _ in range(3):
        x = next(whole)[0]
        assert torch.equal(torch.cat([next(r)[0] for r in ranks]), x)


def test_loader_refuses_a_state_from_other_settings(random_docs):
    data_dir, _, _ = random_docs
    state = TokenLoader(data_dir, "train", batch_size=2, seq_len=16).state_dict()
    with pytest.raises(DataError, match="batch_size=2, this run 4"):
        TokenLoader(data_dir, "train", batch_size=4, seq_len=16).load_state_dict(state)


def test_train_tokenizer_and_tokenize_round_trip(tmp_path):
    rng = random.Random(3)
    texts = []
    for i in range(2):
        path = tmp_path / f"play{i}.txt"
        path.write_text(random_play(rng, 150))
        texts.append(path)
    model = train_tokenizer(texts, tmp_path / "tok.model", vocab_size=320)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.GetPieceSize() == 320
    assert [sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()] == [0, 1, 2, 3]  # Grok's ids
    sample = "JULIET:\nmy lord, what say you?\n  Good morrow, café 42!\n\nROMEO:\nthou art"
    assert sp.decode(sp.encode(sample)) == sample  # newlines, indentation, bytes survive
    meta = tokenize_files(texts, model, tmp_path / "data", val_fraction=0.1)
    train = np.concatenate([np.asarray(s) for s in open_split(tmp_path / "data", "train")])
    val = np.concatenate([np.asarray(s) for s in open_split(tmp_path / "data", "val")])
    ids = [sp.encode(p.read_text()) + [2] for p in texts]
    assert train.size + val.size == sum(map(len, ids)) == sum(d["tokens"] for d in meta["documents"])
    cut = len(ids[0]) - int(len(ids[0]) * 0.1)
    head = sp.decode(train[:cut].tolist())  # doc 0's train part is the start of its text
    assert texts[0].read_text().startswith(head) and len(head) > 0.8 * len(texts[0].read_text())
    assert 0 not in train  # pad id never appears, so the model masks nothing


def test_train_tokenizer_rejects_a_missing_file_and_a_tiny_vocab(tmp_path):
    with pytest.raises(TokenizerTrainError, match="not found: .*nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "t.model")
    (tmp_path / "a.txt").write_text("hello world\n")
    with pytest.raises(TokenizerTrainError, match="vocab_size=100"):
        train_tokenizer([tmp_path / "a.txt"], tmp_path / "t.model", vocab_size=100)


def test_lr_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    cfg = TrainConfig(data_dir="d", out_dir="o", lr=1e-3, min_lr=1e-4, warmup_steps=10,
                      max_steps=110)
    lrs = [get_lr(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # half way: the cosine's midpoint
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:111]))
    assert lrs[110:] == [1e-4] * 20


def test_balance_loss_is_one_when_balanced_and_E_when_collapsed():
    g = torch.Generator().manual_seed(0)
    E, M = 8, 64
    uniform_logits = torch.zeros(M, E) + 0.01 * torch.randn(M, E, generator=g)
    balanced_ids = torch.stack([torch.arange(M) % E, (torch.arange(M) + 1) % E], dim=1)
    assert load_balancing_loss(uniform_logits, balanced_ids).item() == pytest.approx(1.0, abs=0.02)
    collapsed_logits = torch.randn(M, E, generator=g)
    collapsed_logits[:, 3] += 50.0  # the router sends everything to expert 3 ...
    collapsed_ids = torch.full((M, 2), 3)  # ... in both slots
    assert load_balancing_loss(collapsed_logits, collapsed_ids).item() == pytest.approx(E, rel=1e-4)
    assert expert_fractions(balanced_ids, E).tolist() == [1 / E] * E


def test_z_loss_is_the_mean_squared_logsumexp():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(10, 8, generator=g)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_cli_commands_train_a_tokenizer_and_tokenize_globbed_files(tmp_path, capsys):
    from grok1.train.cli_train import main

    rng = random.Random(5)
    for i in range(2):
        (tmp_path / f"scene{i}.txt").write_text(random_play(rng, 120))
    main(["train-tokenizer", str(tmp_path / "scene*.txt"), "--out", str(tmp_path / "t.model"),
          "--vocab-size", "300"])
    main(["tokenize", str(tmp_path / "scene*.txt"), "--tokenizer", str(tmp_path / "t.model"),
          "--out", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert "t.model (vocab 300)" in out and "2 documents" in out
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert [d["file"] for d in meta["documents"]] == ["scene0.txt", "scene1.txt"]
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
