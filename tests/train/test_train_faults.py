"""grok1.train under failures: a killed worker under torchrun, a corrupt checkpoint, NaN losses, a
hang; plus bit-identical resume, activation checkpointing and export (CPU, tiny model)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grok1.config import GrokConfig
from grok1.train.checkpoints import CheckpointCorruptError, CheckpointManager
from grok1.train.data import write_dataset
from grok1.train.train_config import TrainConfig
from grok1.train.trainer import Trainer, TrainerHook, TrainingDiverged

REPO = Path(__file__).resolve().parents[2]
VOCAB = 256  # the tiny preset's


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Token documents from a seeded random Markov chain (4 likely successors per token), so the
    loss has something to learn and resumed runs can be told apart from fresh ones."""
    rng = random.Random(0)
    succ = [[rng.randrange(3, VOCAB) for _ in range(4)] for _ in range(VOCAB)]
    docs = []
    for d in range(3):
        ids = [rng.randrange(3, VOCAB)]
        for _ in range(2500):
            ids.append(rng.choice(succ[ids[-1]]))
        docs.append((f"doc{d}", ids))
    path = tmp_path_factory.mktemp("markov")
    write_dataset(path, docs, VOCAB, val_fraction=0.1)
    return path


def tiny_cfg(data_dir: Path, out_dir: Path, **changes) -> TrainConfig:
    base = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), model="tiny", seed=1,
                       batch_size=2, seq_len=32, max_steps=4, lr=3e-3, min_lr=3e-4,
                       warmup_steps=1, save_every=2, eval_every=4, eval_batches=2, log_every=1,
                       device="cpu", progress=False, tensorboard=False, watchdog_s=0)
    return dataclasses.replace(base, **changes)


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.core.state_dict().items()}


def events(out_dir: Path, kind: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


class NanLoss(TrainerHook):
    """A NaN loss in step s once for each time s is listed (a step that is skipped is tried
    again; a rollback does not re-arm it: the hook outlives the restored trainer state)."""

    def __init__(self, *steps: int):
        self.left = collections.Counter(steps)

    def after_loss(self, trainer, micro_step, ce):
        step = trainer.step + 1
        if micro_step == 0 and self.left[step]:
            self.left[step] -= 1
            return ce * float("nan")  # one NaN micro-step makes the step's mean NaN
        return ce


class InfGradient(TrainerHook):
    """An infinite gradient in step `step`, once, with a finite loss: the grad-norm check's case."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def after_backward(self, trainer):
        if trainer.step + 1 == self.step and not self.done:
            self.done = True
            trainer.core.embed.grad[0, 0] = float("inf")


def torchrun(out_dir: Path, data_dir: Path, *extra: str,
             program: tuple[str, ...] = ("-m", "grok1.train.cli_train", "train")
             ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", *program,
           "--data", str(data_dir), "--out", str(out_dir), "--model", "tiny", "--seed", "1",
           "--batch-size", "2", "--seq-len", "32", "--max-steps", "8", "--lr", "3e-3",
           "--warmup-steps", "2", "--save-every", "2", "--eval-every", "4", "--eval-batches", "2",
           "--log-every", "1", "--device", "cpu", "--no-progress", "--no-tensorboard",
           "--watchdog-s", "60", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
                          check=False)


def test_killed_worker_restarts_by_itself_and_ends_with_the_uninterrupted_loss(data_dir, tmp_path):
    """2 ranks, gloo, FSDP2. Rank 1 dies after step 5 (last checkpoint: step 4); torchrun
    restarts both, they resume from step 4 and finish with the same printed loss."""
    plain = torchrun(tmp_path / "plain", data_dir)
    assert plain.returncode == 0, plain.stderr[-3000:]
    crashed = torchrun(tmp_path / "crashed", data_dir, "--crash-at-step", "5",
                       program=(str(REPO / "tests" / "_train_worker.py"),))
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "fault injection: rank 1 exits after step 5" in crashed.stderr
    assert "resumed from step 4" in crashed.stderr
    assert (tmp_path / "crashed" / "crash.marker").is_file()
    final = re.compile(r"^final step 8 loss (\d+\.\d{6}) val_loss (\d+\.\d{6})$", re.MULTILINE)
    want, got = final.findall(plain.stdout), final.findall(crashed.stdout)
    assert len(want) == 1 and got == want
    first = re.search(r"^step 1 \| loss (\d+\.\d+)", plain.stdout, re.MULTILINE)
    assert float(want[0][0]) < float(first.group(1))  # it did learn something
    assert [r["step"] for r in events(tmp_path / "crashed", "resume")] == [4]


def test_resume_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path):
    whole = Trainer(tiny_cfg(data_dir, tmp_path / "whole")).train()
    first = Trainer(tiny_cfg(data_dir, tmp_path / "parts"))
    first.train_step(), first.train_step()
    first.save()  # then the process "dies"
    resumed = Trainer(tiny_cfg(data_dir, tmp_path / "parts"))
    assert resumed.resume() and resumed.step == 2
    parts = resumed.train()
    assert parts["loss"] == whole["loss"] and parts["val_loss"] == whole["val_loss"]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path):
    out = tmp_path / "run"
    first = Trainer(tiny_cfg(data_dir, out)).train()
    manager = CheckpointManager(out / "checkpoints")
    assert manager.committed_steps() == [4, 2]
    shard = manager.step_dir(4) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"__0_0\.distcp: sha256 differs"):
        manager.verify(4)
    again = Trainer(tiny_cfg(data_dir, out))
    assert again.resume() and again.step == 2
    [fallback] = events(out, "checkpoint_fallback")
    assert fallback["step"] == 4 and "sha256 differs" in fallback["reason"]
    assert again.train()["loss"] == first["loss"]  # steps 3-4 replayed exactly


def test_truncated_checkpoint_and_uncommitted_folders_are_skipped(data_dir, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_cfg(data_dir, out)).train()
    manager = CheckpointManager(out / "checkpoints")
    rank_file = manager.step_dir(4) / "rank-0.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:10])
    (out / "checkpoints" / "step-00000006").mkdir()  # a crash after rename, before the marker
    (out / "checkpoints" / ".step-00000008.tmp").mkdir()  # a crash mid-write
    assert manager.committed_steps() == [4, 2]
    with pytest.raises(CheckpointCorruptError, match=r"rank-0\.pt: 10 bytes, COMMITTED says"):
        manager.verify(4)
    again = Trainer(tiny_cfg(data_dir, out))
    assert again.resume() and again.step == 2


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(data_dir, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_cfg(data_dir, out, max_steps=2)).train()
    (CheckpointManager(out / "checkpoints").step_dir(2) / "rank-0.pt").unlink()
    with pytest.raises(CheckpointCorruptError, match="none of the 1 committed checkpoints"):
        Trainer(tiny_cfg(data_dir, out)).resume()


def test_nan_step_is_skipped_without_touching_the_weights(data_dir, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(data_dir, out), hooks=[NanLoss(1)])
    before = params(trainer)
    assert trainer.train_step() is None and trainer.step == 0
    assert all(torch.equal(before[k], v) for k, v in params(trainer).items())
    assert not trainer.optimizer.state  # AdamW never stepped
    stats = trainer.train_step()  # step 1 again, no NaN this time
    assert trainer.step == 1 and torch.isfinite(torch.tensor(stats["loss"]))
    [skip] = events(out, "skip")
    assert skip["step"] == 1 and "non-finite loss nan" in skip["reason"]


def test_infinite_gradient_with_a_finite_loss_is_skipped_without_touching_the_weights(
        data_dir, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(data_dir, out), hooks=[InfGradient(1)])
    before = params(trainer)
    assert trainer.train_step() is None and trainer.step == 0
    assert all(torch.equal(before[k], v) for k, v in params(trainer).items())
    assert not trainer.optimizer.state
    assert trainer.train_step()["step"] == 1
    [skip] = events(out, "skip")
    assert skip["step"] == 1 and re.search(r"non-finite loss \d+\.\d+ or grad norm inf$",
                                           skip["reason"])


def test_repeated_nan_steps_roll_back_to_the_last_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(data_dir, out, max_bad_steps=2)
    result = Trainer(cfg, hooks=[NanLoss(4, 4)]).train()
    [rollback] = events(out, "rollback")
    assert rollback["from_step"] == 3 and rollback["step"] == 2
    assert "2 non-finite steps in a row" in rollback["reason"]
    assert [e["step"] for e in events(out, "skip")] == [4, 4]
    assert result["step"] == 4 and torch.isfinite(torch.tensor(result["loss"]))


def test_nan_with_no_checkpoint_to_roll_back_to_stops_training(data_dir, tmp_path):
    trainer = Trainer(tiny_cfg(data_dir, tmp_path / "run", max_bad_steps=2),
                      hooks=[NanLoss(1, 1)])
    assert trainer.train_step() is None
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row and no checkpoint"):
        trainer.train_step()


def test_watchdog_exits_with_a_message_and_every_stack():
    code = ("import time\nfrom grok1.train.monitor import Watchdog\n"
            "def stuck_in_allreduce():\n    time.sleep(30)\n"
            "Watchdog(0.4).start()\nstuck_in_allreduce()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert proc.returncode == 3
    assert "grok1 train watchdog: no progress for" in proc.stderr
    assert "stuck_in_allreduce" in proc.stderr  # the main thread's stack is in the dump


def test_activation_checkpointing_gives_the_same_step(data_dir, tmp_path):
    results = []
    for ac in (False, True):
        trainer = Trainer(tiny_cfg(data_dir, tmp_path / str(ac), activation_checkpointing=ac))
        stats = [trainer.train_step() for _ in range(2)]
        results.append(([s["loss"] for s in stats], [s["grad_norm"] for s in stats],
                        params(trainer)))
    (loss_a, grad_a, p_a), (loss_b, grad_b, p_b) = results
    assert loss_a == loss_b and grad_a == grad_b  # recomputation repeats the same ops
    assert all(torch.equal(p_a[k], p_b[k]) for k in p_a)


def test_exported_model_gives_the_trained_models_logits(data_dir, tmp_path):
    from grok1.checkpoint.native import load_native
    from grok1.train.export import export_run, load_trained

    out = tmp_path / "run"
    Trainer(tiny_cfg(data_dir, out)).train()
    folder = export_run(out, tmp_path / "exported", None)
    exported = load_native(folder)
    trained, step = load_trained(out)
    assert step == 4 and exported.config == GrokConfig.preset("tiny")
    assert exported.embed.dtype == torch.bfloat16
    assert exported.layers[0].moe.router.dtype == torch.float32
    tokens = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # The f32 model casts every matrix to bf16 in forward, so the bf16 export is exact.
        assert torch.equal(exported.eval()(tokens), trained.eval()(tokens))
