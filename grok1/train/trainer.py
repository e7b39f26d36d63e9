"""Train a Grok-architecture model: the same `grok1.model.Grok1` that inference runs.

One process on CPU or one GPU:
    grok1 train --data DATA --out runs/x --model tiny
Several GPUs, one node (FSDP2):
    torchrun --standalone --nproc-per-node 8 -m grok1 train --data DATA --out runs/x --model cfg.json
Restarts that resume by themselves: add `--max-restarts 3` to torchrun; every run starts by loading
the newest complete checkpoint under OUT/checkpoints.

The loop follows nanoGPT's train.py: a pure `get_lr(step)`, gradient sync only on the last
micro-step, weight decay by rule (matrices decayed, vectors not), tokens/s and MFU beside the loss.
Master weights are f32; the model casts to bf16 where the reference does, which makes this bf16
mixed precision without autocast. Continuation after a restart is bit-identical: model, optimizer,
step (hence LR), RNG and data position all come back from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from grok1.config import ConfigError, GrokConfig
from grok1.model import Grok1
from grok1.parallel.mesh import init_distributed, shutdown
from grok1.train import fsdp
from grok1.train.checkpoints import CheckpointManager
from grok1.train.data import DataError, TokenLoader, load_meta
from grok1.train.losses import cross_entropy, router_losses
from grok1.train.monitor import MetricsLog, Watchdog
from grok1.train.train_config import TrainConfig, get_lr

log = logging.getLogger(__name__)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}


def flops_per_token(config: GrokConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters (attention, router, the A chosen
    experts, the tied unembedding) + 12 x L x N*H x T for QK^T and PV (nanoGPT/PaLM count)."""
    D, H, L = config.emb_size, config.key_size, config.num_layers
    attn = 2 * D * config.num_q_heads * H + 2 * D * config.num_kv_heads * H
    experts = config.num_selected_experts * 3 * D * config.ffn_size
    active = L * (attn + D * config.num_experts + experts) + config.vocab_size * D
    return 6 * active + 12 * L * config.num_q_heads * H * seq_len


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class ModelOptimState:
    """DCP Stateful for model + optimizer, sharded or not (torch.distributed.checkpoint.state_dict).
    `trainable_only`: the model's state is its trainable parameters alone (fine-tuning: adapters
    over a frozen base, whose hundreds of GB are the base checkpoint's, not the run's)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 trainable_only: bool = False):
        self.model, self.optimizer = model, optimizer
        self.trainable_only = trainable_only

    def _model_state(self) -> dict[str, Any]:
        if self.trainable_only:
            return {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        return get_model_state_dict(self.model)

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self._model_state()}
        if self.optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.trainable_only:
            with torch.no_grad():
                for k, p in self._model_state().items():
                    p.copy_(state["model"][k])
        else:
            set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])


class TrainingDiverged(RuntimeError):
    """Non-finite losses persisted and there is no checkpoint to roll back to."""


class TrainerHook:
    """Callbacks at fixed points of `Trainer`'s loop, each a no-op here: a subclass overrides the
    ones it needs. The tests inject faults through them (a NaN loss, a poisoned gradient, a rank
    that dies), so no fault switch sits in TrainConfig or the loop. During a step,
    `trainer.step + 1` is the number of the step being computed."""

    def after_loss(self, trainer: Trainer, micro_step: int, ce: torch.Tensor) -> torch.Tensor:
        """Each micro-step's cross-entropy before backward; returns the one to use."""
        return ce

    def after_backward(self, trainer: Trainer) -> None:
        """The step's gradients are complete (all micro-steps), not yet clipped or applied."""

    def after_step(self, trainer: Trainer) -> None:
        """A step counted (trainer.step is its number); its eval and checkpoint, if due, done."""


class Trainer:
    """Owns the model, optimizer, data and checkpoints of one run; Stateful (step, data position,
    RNG) so that a checkpoint restores it exactly.

    `model`: train this model (its parameters that require grad: LoRA adapters over a frozen
    base, grok1.train.finetune) instead of a fresh one of `cfg.model` from init_weights;
    checkpoints then hold only those parameters and their optimizer state. One process."""

    def __init__(self, cfg: TrainConfig, hooks: Sequence[TrainerHook] = (),
                 model: Grok1 | None = None):
        self.cfg = cfg
        self.hooks = list(hooks)
        self.dist = init_distributed(device=cfg.device)
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        self.config = GrokConfig.resolve(cfg.model) if model is None else model.config
        self.trainable_only = model is not None
        if model is not None and self.dist.world_size > 1:
            raise ConfigError(f"training a given model (fine-tuning) runs in one process; "
                              f"{self.dist.world_size} ranks were launched")
        meta = load_meta(cfg.data_dir)
        if meta["vocab_size"] != self.config.vocab_size:
            raise DataError(f"{cfg.data_dir}: tokens from a vocabulary of {meta['vocab_size']}, "
                            f"model vocab_size={self.config.vocab_size}")
        if cfg.seq_len > self.config.sequence_len:
            raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's sequence_len="
                              f"{self.config.sequence_len}")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.config.save_json(self.out_dir / "config.json")
            cfg_dict = dataclasses.asdict(cfg)
            (self.out_dir / "train_config.json").write_text(json.dumps(cfg_dict, indent=1) + "\n")
        if self.dist.world_size > 1:
            dist.barrier()

        torch.manual_seed(cfg.seed + self.dist.rank)
        if model is None:
            model = Grok1(self.config, dtype=torch.float32, expert_down=cfg.expert_down)
            model.init_weights(torch.Generator().manual_seed(cfg.seed))  # the same on every rank
        model.attention = cfg.attention  # the run's kernel (a given model's too: fine-tuning)
        model.to(self.device)
        if cfg.activation_checkpointing:
            fsdp.apply_activation_checkpointing(model)
        if cfg.compile:
            fsdp.apply_compile(model)
        self.core = model  # the unwrapped Grok1 (its layers hold the router records)
        self.mode = cfg.parallel if cfg.parallel != "auto" else (
            "fsdp" if self.dist.world_size > 1 else "none")
        if self.mode != "none" and self.dist.world_size == 1:
            self.mode = "none"
        if self.mode == "fsdp":
            fsdp.apply_fsdp(model, self.device.type)
        self.model = fsdp.apply_ddp(model, self.device) if self.mode == "ddp" else model
        self.optimizer = self._build_optimizer()

        common = {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed,
                  "rank": self.dist.rank, "world_size": self.dist.world_size}
        self.loader = TokenLoader(cfg.data_dir, "train", **common)
        self.val_loader_args = {**common, "shuffle": False}
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", keep=cfg.keep_checkpoints)
        self.metrics = MetricsLog(self.out_dir, self.dist.is_main, cfg.tensorboard)
        self.step, self.tokens_seen, self.bad_steps = 0, 0, 0
        self.tokens_per_step = (cfg.batch_size * cfg.seq_len * cfg.grad_accum
                                * self.dist.world_size)
        self.flops_per_step = flops_per_token(self.config, cfg.seq_len) * self.tokens_per_step
        self.peak_tflops = cfg.peak_tflops or detect_peak_tflops(self.device)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]  # matrices, embedding, router
        no_decay = [p for p in params if p.ndim < 2]  # norm scales
        if self.dist.is_main:
            log.info("AdamW: %d decayed tensors (%d params), %d not decayed (%d params)",
                     len(decay), sum(p.numel() for p in decay), len(no_decay),
                     sum(p.numel() for p in no_decay))
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                                 fused=self.device.type == "cuda")

    # ---- Stateful -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rng": rng,
                "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any], *, data: bool = True) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if data:
            self.loader.load_state_dict(state["loader"])

    def save(self) -> None:
        self.checkpoints.save(self.step, {"app": self._app_state()}, self.state_dict())
        self.metrics.write({"event": "checkpoint", "step": self.step})

    def _app_state(self) -> ModelOptimState:
        return ModelOptimState(self.model, self.optimizer, self.trainable_only)

    def resume(self, *, data: bool = True) -> bool:
        """Load the newest good checkpoint; False when there is none (a fresh run)."""
        def fallback(step: int, reason: str) -> None:
            self.metrics.write({"event": "checkpoint_fallback", "step": step, "reason": reason})

        found = self.checkpoints.load_latest({"app": self._app_state()}, on_fallback=fallback)
        if found is None:
            return False
        _, rank_state = found
        self.load_state_dict(rank_state, data=data)
        return True

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to max_steps (resuming first if a checkpoint exists); returns the final metrics."""
        cfg, main = self.cfg, self.dist.is_main
        watchdog = Watchdog(cfg.watchdog_s).start()
        watchdog.beat("resume")
        if self.resume():
            self.metrics.write({"event": "resume", "step": self.step})
            if main:
                log.info("resumed from step %d", self.step)
        bar = None
        if main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        say = bar.write if bar is not None else print
        last: dict[str, Any] = {}
        t_log, tokens_log = time.perf_counter(), 0
        while self.step < cfg.max_steps:
            stats = self.train_step()
            watchdog.beat(f"step {self.step}")
            if stats is None:  # skipped or rolled back
                if bar is not None:
                    bar.n = self.step
                    bar.refresh()
                continue
            tokens_log += self.tokens_per_step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t_log
                stats["tok_s"] = tokens_log / dt
                if self.peak_tflops:
                    achieved = stats["tok_s"] / self.tokens_per_step * self.flops_per_step
                    stats["mfu"] = achieved / (self.peak_tflops * 1e12 * self.dist.world_size)
                t_log, tokens_log = time.perf_counter(), 0
                self.metrics.write(stats)
                if main:
                    mfu = f" | mfu {100 * stats['mfu']:.1f}% of {self.peak_tflops:.0f} TFLOP/s" \
                        if "mfu" in stats else ""
                    say(f"step {self.step} | loss {stats['loss']:.6f} | balance "
                        f"{stats['balance']:.3f} | lr {stats['lr']:.2e} | grad {stats['grad_norm']:.3f}"
                        f" | {stats['tok_s']:.0f} tok/s{mfu}")
            last = stats
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                watchdog.beat(f"eval after step {self.step}")
                val = self.evaluate()
                if val is not None:
                    last["val_loss"] = val
                    self.metrics.write({"event": "eval", "step": self.step, "val_loss": val})
                    if main:
                        say(f"step {self.step} | val_loss {val:.6f}")
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                watchdog.beat(f"checkpoint at step {self.step}")
                self.save()
            watchdog.beat(f"step {self.step} done")
            for hook in self.hooks:
                hook.after_step(self)
        watchdog.stop()
        if bar is not None:
            bar.close()
        if main and last:
            val = f" val_loss {last['val_loss']:.6f}" if "val_loss" in last else ""
            print(f"final step {self.step} loss {last['loss']:.6f}{val}", flush=True)
        self.metrics.close()
        return last

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step over grad_accum micro-batches; None when it was skipped."""
        cfg = self.cfg
        self.model.train()
        lr = get_lr(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(3, device=self.device)  # ce, balance, z (detached, summed)
        util = None
        for micro in range(cfg.grad_accum):
            x, y = next(self.loader)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1  # gradients are reduced on the last micro-step only
            if self.mode == "fsdp":
                self.model.set_requires_gradient_sync(sync)
            no_sync = self.model.no_sync() if self.mode == "ddp" and not sync \
                else contextlib.nullcontext()
            with no_sync:
                ce = cross_entropy(self.model(x), y)
                for hook in self.hooks:
                    ce = hook.after_loss(self, micro, ce)
                router = router_losses(self.core.layers)
                loss = ce + cfg.aux_loss_coef * router.balance + cfg.z_loss_coef * router.z
                (loss / cfg.grad_accum).backward()
            sums += torch.stack([ce.detach(), router.balance.detach(), router.z.detach()])
            u = torch.cat([torch.stack(router.utilisation_per_layer),  # [L, E] shares
                           torch.stack(router.balance_per_layer)[:, None]], dim=1)  # + balance
            util = u if util is None else util + u
        for hook in self.hooks:
            hook.after_backward(self)
        sums /= cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already the global norm
            grad_norm = grad_norm.full_tensor()
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
            sums /= self.dist.world_size
        util = util / cfg.grad_accum  # [L, E + 1]: this rank's routing shares, then balance
        # the step's one host sync: the losses, the norm and the routing statistics together
        values = torch.cat([sums, grad_norm.reshape(1).float(), util.flatten()]).tolist()
        (ce, balance, z, gnorm), shares = values[:4], values[4:]
        width = util.shape[1]
        util_rows = [shares[i:i + width] for i in range(0, len(shares), width)]
        if not all(math.isfinite(v) for v in (ce, gnorm)):
            self.optimizer.zero_grad(set_to_none=True)
            return self._bad_step(f"non-finite loss {ce} or grad norm {gnorm}")
        self.bad_steps = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        stats = {"step": self.step, "loss": ce, "balance": balance, "z_loss": z, "lr": lr,
                 "grad_norm": gnorm, "tokens": self.tokens_seen}
        for i, row in enumerate(util_rows):
            stats[f"layer{i}/balance"] = row[-1]
            stats[f"layer{i}/experts"] = [round(u, 4) for u in row[:-1]]
        return stats

    def _bad_step(self, reason: str) -> None:
        """Skip this step; after max_bad_steps in a row roll back to the newest checkpoint
        (keeping the data position, so the batches that diverged are not replayed)."""
        self.bad_steps += 1
        self.metrics.write({"event": "skip", "step": self.step + 1, "reason": reason})
        log.warning("step %d skipped: %s", self.step + 1, reason)
        if self.bad_steps < self.cfg.max_bad_steps:
            return
        if not self.checkpoints.committed_steps():
            raise TrainingDiverged(f"{self.bad_steps} non-finite steps in a row and no "
                                   f"checkpoint under {self.checkpoints.root} to roll back to")
        at = self.step
        self.resume(data=False)
        why = f"{self.bad_steps} non-finite steps in a row (last: {reason})"
        self.metrics.write({"event": "rollback", "from_step": at, "step": self.step, "reason": why})
        log.warning("rolled back from step %d to checkpoint step %d: %s", at, self.step, why)
        self.bad_steps = 0
        return

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the first eval_batches windows of the val split (the same
        windows every time); None when the dataset has no val split big enough."""
        try:
            loader = TokenLoader(self.cfg.data_dir, "val", **self.val_loader_args)
        except DataError as e:
            log.warning("no validation: %s", e)
            return None
        self.model.eval()
        total = torch.zeros(1, device=self.device)
        n = min(self.cfg.eval_batches, loader.batches_per_epoch)
        for _ in range(n):
            x, y = next(loader)
            total += cross_entropy(self.model(x.to(self.device)), y.to(self.device))
        if self.dist.world_size > 1:
            dist.all_reduce(total)
        self.model.train()
        return total.item() / (n * self.dist.world_size)


def train(cfg: TrainConfig, hooks: Sequence[TrainerHook] = ()) -> dict[str, Any]:
    """Build a Trainer, run it, and leave the process group."""
    try:
        return Trainer(cfg, hooks).train()
    finally:
        shutdown(barrier=False)  # without waiting for peers: one may have died (a fault)
