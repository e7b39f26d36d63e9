"""`grok1 finetune` and `grok1 merge` (grok1/train/finetune.py) on the embedded model: LoRA lowers
the held-out loss of a text the model never saw, a killed run resumes to the adapter of an
uninterrupted one, checkpoints hold the adapters alone, and the merged folder loads to the
unmerged model's logits."""

import json
import random
from pathlib import Path

import pytest
import torch

import grok1
from grok1.checkpoint.peft import fill_adapter, read_adapter, save_adapter
from grok1.config import ConfigError
from grok1.lora import TARGETS, LoraConfig, apply_lora, lora_modules
from grok1.model import Grok1
from grok1.train.data import DataError, TokenLoader
from grok1.train.finetune import DATA_DIR, finetune, merge, prepare_data, read_examples
from grok1.train.losses import cross_entropy
from grok1.train.train_config import TrainConfig
from grok1.train.trainer import ModelOptimState, TrainerHook

BASE = grok1.default_model_dir()


def new_text(n: int, seed: int) -> list[dict]:
    """Sentences of a small grammar about programmers: nothing like the Shakespeare the
    embedded model learned, with structure an adapter can pick up in a few steps."""
    rng = random.Random(seed)
    names = ["Ada", "Linus", "Grace", "Alan", "Edsger", "Barbara"]
    things = ["compilers", "kernels", "proofs", "networks", "queues", "tables"]
    verbs = ["writes", "tests", "breaks", "ships", "reviews"]
    return [{"text": f"{rng.choice(names)} {rng.choice(verbs)} {rng.randint(2, 9)} "
                     f"{rng.choice(things)} on day {rng.randint(1, 30)}."} for _ in range(n)]


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def run_config(out: Path, **changes) -> TrainConfig:
    fields = dict(data_dir="", out_dir=str(out), batch_size=4, seq_len=32, max_steps=10,
                  lr=1e-2, min_lr=0.0, warmup_steps=2, weight_decay=0.0, aux_loss_coef=0.0,
                  eval_every=1000, eval_batches=4, save_every=5, log_every=5, device="cpu",
                  progress=False, tensorboard=False, watchdog_s=0)
    return TrainConfig(**{**fields, **changes})


def held_out_loss(model: Grok1, data_dir: Path, batches: int = 4) -> float:
    loader = TokenLoader(data_dir, "val", batch_size=4, seq_len=32, shuffle=False)
    with torch.no_grad():
        return sum(cross_entropy(model(x), y).item() for x, y in
                   (next(loader) for _ in range(batches))) / batches


@pytest.mark.slow
def test_lora_finetune_lowers_held_out_loss_on_a_new_text(tmp_path):
    data = write_jsonl(tmp_path / "new.jsonl", new_text(400, seed=0))
    lora = LoraConfig(r=8, alpha=16.0, targets=TARGETS)
    result = finetune(BASE, data, run_config(tmp_path / "run"), lora)
    base = grok1.load(BASE)
    data_dir = tmp_path / "run" / DATA_DIR
    before = held_out_loss(base, data_dir)
    config, tensors = read_adapter(result["adapter"], base.config)  # the saved PEFT folder
    assert config == lora
    apply_lora(base, config)
    fill_adapter(base, tensors, config)
    after = held_out_loss(base.eval(), data_dir)
    # measured: 9.2 -> 1.6 nats per token in 10 steps of 128 tokens (the base, trained on
    # Shakespeare, is confidently wrong here: worse than uniform, ln 2048 = 7.6)
    assert after < 0.6 * before, (before, after)
    assert abs(after - result["val_loss"]) < 0.05 * after  # the trainer's own evaluation


class _Crash(TrainerHook):
    """Ends the run after step `at` (its checkpoint, if due, is written)."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self, trainer):
        if trainer.step == self.at:
            raise KeyboardInterrupt(f"crash after step {self.at}")


def adapters_of(out: Path) -> dict[str, torch.Tensor]:
    _, tensors = read_adapter(out / "adapter", grok1.load(BASE).config)
    return tensors


def test_killed_finetune_resumes_to_the_uninterrupted_adapter(tmp_path):
    data = write_jsonl(tmp_path / "new.jsonl", new_text(200, seed=1))
    lora = LoraConfig(r=4, alpha=8.0, dropout=0.1, targets=("attn.wv", "moe.w_down"))
    short = dict(batch_size=2, seq_len=16, max_steps=6, save_every=2)
    finetune(BASE, data, run_config(tmp_path / "whole", **short), lora)
    with pytest.raises(KeyboardInterrupt):
        finetune(BASE, data, run_config(tmp_path / "killed", **short), lora, hooks=[_Crash(5)])
    assert not (tmp_path / "killed" / "adapter").exists()
    finetune(BASE, data, run_config(tmp_path / "killed", **short), lora)  # resumes at step 4
    whole, resumed = adapters_of(tmp_path / "whole"), adapters_of(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for k in whole:  # bit-identical: adapters, AdamW state, RNG (dropout) and data position
        assert torch.equal(whole[k], resumed[k]), k
    assert any(t.abs().sum() > 0 for k, t in whole.items() if k.endswith("lora_B"))
    events = [json.loads(line)["event"] for line in
              (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
              if '"event"' in line]
    assert "resume" in events


def test_checkpoint_state_is_the_adapters_and_their_optimizer_state_only():
    model = grok1.load(BASE)
    apply_lora(model, LoraConfig(r=2, targets=("attn.wq", "moe.w_up")))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    state = ModelOptimState(model, opt, trainable_only=True).state_dict()
    L = model.config.num_layers
    assert sorted(state["model"]) == sorted(f"layers.{i}.{t}.{ab}" for i in range(L)
                                            for t in ("attn.wq", "moe.w_up")
                                            for ab in ("lora_A", "lora_B"))


def test_resuming_with_another_adapter_shape_or_dataset_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", new_text(120, seed=2))
    out = tmp_path / "run"
    finetune(BASE, data, run_config(out, batch_size=2, seq_len=16, max_steps=1),
             LoraConfig(r=2))
    with pytest.raises(ConfigError, match="lora.json.*'r': 2.*'r': 4"):
        finetune(BASE, data, run_config(out, max_steps=2), LoraConfig(r=4))
    write_jsonl(data, new_text(120, seed=3))
    with pytest.raises(DataError, match="a.jsonl differs"):
        finetune(BASE, data, run_config(out, max_steps=2), LoraConfig(r=2))


def test_jsonl_examples_text_and_chat_and_errors_name_the_line(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [
        {"text": "plain words"},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]}])
    text = "System: Be brief.\nUser: Hi\nAssistant: Hello."
    assert list(read_examples(good)) == [("plain words", None), (text, [(37, len(text))])]
    assert text[37:] == " Hello."
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: expected"):
        list(read_examples(bad))
    bad.write_text('{"messages": [{"role": "robot", "content": "beep"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: messages\[0\] needs a role"):
        list(read_examples(bad))
    bad.write_text('{"text": "ok"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid JSON"):
        list(read_examples(bad))
    with pytest.raises(DataError, match=r"missing.jsonl: JSONL dataset not found"):
        prepare_data(tmp_path / "missing.jsonl", None, tmp_path / "data")


def test_merge_writes_a_grok1_folder_with_the_adapted_logits(tmp_path):
    """The embedded model in float32 compute: the merged folder's logits equal the unmerged
    model's up to the bf16 rounding of the merged matrices."""
    model = grok1.load(BASE)
    lora = LoraConfig(r=4, alpha=8.0, targets=TARGETS)
    apply_lora(model, lora, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    adapter = save_adapter(model, lora, tmp_path / "adapter")
    out = merge(BASE, adapter, tmp_path / "merged")
    merged = grok1.load(out)
    assert (out / "tokenizer.model").is_file() and merged.weights is None
    tokens = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    model.compute_dtype = merged.compute_dtype = torch.float32
    base = grok1.load(BASE)
    base.compute_dtype = torch.float32
    unmerged, folded, plain = model(tokens), merged(tokens), base(tokens)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(unmerged, plain) > 0.1  # the adapter matters
    assert rel(folded, unmerged) < 0.01, rel(folded, unmerged)


def test_cli_finetune_then_merge(tmp_path, capsys):
    from grok1.cli import main

    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Add {i} and {i}."},
                      {"role": "assistant", "content": f"{2 * i}."}]} for i in range(60)])
    main(["finetune", "--base", str(BASE), "--data", str(data), "--out", str(tmp_path / "run"),
          "--lora-rank", "2", "--lora-targets", "attn.wq,experts", "--max-steps", "2",
          "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--no-progress",
          "--no-tensorboard"])
    adapter = tmp_path / "run" / "adapter"
    assert capsys.readouterr().out.strip().endswith(f"adapter {adapter}")
    config, _ = read_adapter(adapter, grok1.load(BASE).config)
    assert (config.r, config.alpha, config.dropout) == (2, 16.0, 0.05)
    assert config.targets == ("attn.wq", "moe.w_gate", "moe.w_up", "moe.w_down")
    main(["merge", "--base", str(BASE), "--adapter", str(adapter), "--out",
          str(tmp_path / "merged")])
    assert grok1.load(tmp_path / "merged").weights is None
    with pytest.raises(SystemExit, match="ConfigError: LoRA targets .*attn.wz"):
        main(["finetune", "--base", str(BASE), "--data", str(data), "--out",
              str(tmp_path / "run2"), "--lora-targets", "attn.wz"])


def test_chat_examples_train_on_the_assistant_replies_alone(tmp_path):
    """The loss mask counts a reply's tokens, its line break and the final eos; the prompt
    lines are IGNORE targets, and the loss is the mean over the counted ones."""
    from grok1.train.data import IGNORE
    from grok1.train.finetune import counted_tokens

    tok = grok1.Tokenizer(BASE / "tokenizer.model")
    chat = {"messages": [{"role": "user", "content": "What is two and two?"},
                         {"role": "assistant", "content": "Four, my lord."},
                         {"role": "user", "content": "And three?"},
                         {"role": "assistant", "content": "Six."}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [chat] * 40)
    (text, spans), = read_examples(write_jsonl(tmp_path / "one.jsonl", [chat]))
    ids, counted = counted_tokens(tok, text, spans)
    assert ids[:-1] == tok.encode(text) and ids[-1] == tok.eos_id
    kept = tok.decode([i for i, c in zip(ids[:-1], counted) if c])
    assert kept.replace("\n", "|") == "Four, my lord.| Six."  # ▁Six after a line break
    assert counted[-1] == 1 and sum(counted) < len(ids) / 2
    prepare_data(data, tok, tmp_path / "data", val_fraction=0.1)
    T = 56  # a window covers one example and part of the next
    assert len(ids) < T < 2 * len(ids)
    x, y = next(TokenLoader(tmp_path / "data", "train", batch_size=2, seq_len=T,
                            shuffle=False))
    want = torch.tensor([(i if c else IGNORE) for i, c in zip(ids, counted)] * 3)
    assert torch.equal(y[0], want[1:T + 1]) and torch.equal(x[0], torch.tensor(ids * 3)[:T])
    logits = torch.randn(2, T, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    keep = y != IGNORE
    want_loss = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(cross_entropy(logits, y), want_loss)
    assert cross_entropy(logits, torch.full_like(y, IGNORE)).item() == 0.0


def test_a_loss_mask_of_another_length_is_refused(tmp_path):
    from grok1.train.data import write_dataset

    with pytest.raises(DataError, match="doc: a loss mask of 2 flags for 3 tokens"):
        write_dataset(tmp_path / "d", [("doc", [5, 6, 7], [1, 0])], 16, masked=True)
