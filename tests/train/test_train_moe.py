"""Training with the grouped MoE: the train-1b preset's size, the expert_down and compile
options reaching the model, and the router statistics counted without a host sync."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from grok1.config import ConfigError, GrokConfig
from grok1.model import DenseContext, Grok1
from grok1.train import fsdp
from grok1.train.data import write_dataset
from grok1.train.losses import cross_entropy, expert_fractions, router_losses
from grok1.train.train_config import TrainConfig
from grok1.train.trainer import Trainer
from tests.conftest import gpu

VOCAB = 256  # the tiny preset's


def test_train_1b_preset_has_about_a_billion_parameters_of_grok_shape():
    c = GrokConfig.preset("train-1b")
    with torch.device("meta"):
        model = Grok1(c, dtype=torch.float32)
    counted = sum(p.numel() for p in model.parameters())
    D, F, E, H = c.emb_size, c.ffn_size, c.num_experts, c.key_size
    attention = 2 * D * c.num_q_heads * H + 2 * D * c.num_kv_heads * H
    layer = attention + D * E + 3 * E * D * F + 4 * D  # + router, experts, four norms
    assert counted == c.num_layers * layer + c.vocab_size * D + D  # + tied table, final norm
    assert 0.95e9 < counted < 1.1e9
    assert (D, F, c.num_q_heads // c.num_kv_heads, H) == (1536, 2048, 6, 128)  # Grok's 6:1 GQA
    assert D % 8 == 0 and F % 8 == 0  # 16-byte rows: torch._grouped_mm's fast path


def test_expert_fractions_count_every_assignment():
    g = torch.Generator().manual_seed(21)
    ids = torch.multinomial(torch.rand(8, generator=g).expand(50, 8), 2, generator=g)
    want = torch.bincount(ids.flatten(), minlength=8).float() / ids.numel()
    assert torch.equal(expert_fractions(ids, 8), want) and float(want.sum()) == pytest.approx(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rng = random.Random(1)
    ids = [rng.randrange(3, VOCAB) for _ in range(3000)]
    path = tmp_path_factory.mktemp("tokens")
    write_dataset(path, [("doc", ids)], VOCAB, val_fraction=0.0)
    return path


def tiny_cfg(data_dir: Path, out_dir: Path, **changes) -> TrainConfig:
    base = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), model="tiny", seed=1,
                       batch_size=2, seq_len=32, max_steps=2, warmup_steps=1, device="cpu",
                       progress=False, tensorboard=False, watchdog_s=0)
    return dataclasses.replace(base, **changes)


def test_expert_down_reaches_every_moe_and_changes_the_loss_by_a_rounding(data_dir, tmp_path):
    """bf16 expert down-projections (an opt-in numerics) train the same model: the first step's
    loss differs from the reference numerics' only by roundings (2^-9 each, averaged over the
    batch, far below 1e-3 relative), but does differ."""
    losses = {}
    for down in ("f32", "bf16"):
        trainer = Trainer(tiny_cfg(data_dir, tmp_path / down, expert_down=down))
        assert {layer.moe.expert_down for layer in trainer.core.layers} == {down}
        losses[down] = trainer.train_step()["loss"]
    assert losses["f32"] != losses["bf16"]
    assert abs(losses["bf16"] - losses["f32"]) < 1e-3 * losses["f32"]
    with pytest.raises(ConfigError, match="expert_down='fp16'"):
        tiny_cfg(data_dir, tmp_path, expert_down="fp16")


def test_attention_option_reaches_the_model_and_changes_the_loss_by_a_rounding(data_dir,
                                                                               tmp_path):
    """--attention flex (grok1.model.attention_flex) computes the same loss at its rounding (f32
    scores): the first batch's loss, forward only (torch's CPU flex_attention has no backward),
    within 1e-4 relative of the plain attention's (measured 3e-6: a fresh model's attention is
    nearly uniform) but not equal. A step is the GPU test's."""
    losses = {}
    for kernel in ("plain", "flex"):
        trainer = Trainer(tiny_cfg(data_dir, tmp_path / kernel, attention=kernel))
        assert trainer.core.attention == kernel
        x, y = next(trainer.loader)
        with torch.no_grad():
            losses[kernel] = cross_entropy(trainer.model(x), y).item()
    assert losses["flex"] != losses["plain"]
    assert abs(losses["flex"] - losses["plain"]) < 1e-4 * losses["plain"]


def test_attention_option_of_grok1_train_and_finetune_reaches_the_train_config(tmp_path):
    import argparse

    from grok1.train.cli_train import add_finetune_args, add_train_args, train_config_from_args

    for add, extra in ((add_train_args, []), (add_finetune_args, ["--base", str(tmp_path)])):
        p = argparse.ArgumentParser()
        add(p)
        args = p.parse_args(["--data", str(tmp_path), "--out", str(tmp_path), *extra,
                             "--attention", "flex"])
        assert train_config_from_args(args, data_dir="", model="tiny").attention == "flex"
        assert p.parse_args(["--data", "d", "--out", "o", *extra]).attention == "plain"


@gpu
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_trains_on_a_gpu_as_the_plain_one_does(data_dir, tmp_path):
    """Two steps with each kernel, compiled flex forward and backward: losses within 1e-3.
    The tiny preset with heads of 16 (the GPU kernel's least), its 6:1 GQA kept."""
    config = tmp_path / "config.json"
    GrokConfig.preset("tiny").replace(key_size=16).save_json(config)
    losses = {}
    for kernel in ("plain", "flex"):
        trainer = Trainer(tiny_cfg(data_dir, tmp_path / kernel, attention=kernel, device="cuda",
                                   model=str(config)))
        losses[kernel] = [trainer.train_step()["loss"] for _ in range(2)]
    for flex, plain in zip(losses["flex"], losses["plain"]):
        assert abs(flex - plain) < 1e-3 * plain, losses


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_compute_what_eager_ones_do(checkpointing):
    """apply_compile traces each layer (dynamo; the eager backend keeps CPU CI free of a C++
    build), also through activation checkpointing as the trainer orders them: the same loss
    and gradients as the uncompiled model, parameter names unchanged."""
    config = GrokConfig.preset("tiny")
    g = torch.Generator().manual_seed(22)
    tokens = torch.randint(3, VOCAB, (2, 17), generator=g)
    runs = []
    for compiled in (False, True):
        model = Grok1(config, dtype=torch.float32, expert_down="bf16")
        model.init_weights(torch.Generator().manual_seed(23))
        model.train()
        names = [n for n, _ in model.named_parameters()]
        if checkpointing:
            fsdp.apply_activation_checkpointing(model)
        if compiled:
            fsdp.apply_compile(model, backend="eager")
            assert [n for n, _ in model.named_parameters()] == names
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@gpu
def test_decoder_layers_train_without_a_host_sync_with_bf16_expert_down():
    """The decoder stack's training forward (attention, the MoE, norms), the router losses and
    the backward run with CUDA's sync debug mode raising on any host sync. (The embedding and
    cross-entropy around it are not this test's; the trainer's one sync a step is its
    statistics' .tolist() after backward.)"""
    config = GrokConfig.preset("tiny")  # widths of 16-byte rows: torch._grouped_mm's fast path
    model = Grok1(config, dtype=torch.float32, expert_down="bf16")
    model.init_weights(torch.Generator().manual_seed(24))
    model.cuda().train()
    B, T = 4, 32
    g = torch.Generator().manual_seed(25)
    h = torch.randn(B, T, config.emb_size, generator=g).to(torch.bfloat16).cuda()
    h.requires_grad_()
    t_T = torch.arange(T, device="cuda")
    mask_BTS = (t_T[:, None] >= t_T[None, :]).expand(B, T, T)  # causal, no padding
    ctx = DenseContext(t_T.expand(B, T), mask_BTS, None, config)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model.run_layers(h, ctx)
        router = router_losses(model.layers)
        (out.float().square().mean() + 0.01 * router.balance).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    grads = [p.grad for layer in model.layers for p in layer.parameters()] + [h.grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert float(model.layers[0].moe.w_down.weight.grad.abs().sum()) > 0
