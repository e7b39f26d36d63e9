"""TrainConfig (every setting of a training run, validated where declared) and the LR schedule.

Kept apart from trainer.py so that building the `grok1 train` argument parser imports no
torch.distributed.
"""

from __future__ import annotations

import dataclasses
import math

from grok1.config import ConfigError
from grok1.model import ATTENTION_KERNELS, EXPERT_DOWN


@dataclasses.dataclass
class TrainConfig:
    data_dir: str  # folder written by `grok1 tokenize`
    out_dir: str  # checkpoints/, metrics.jsonl, config.json
    model: str = "tiny"  # a GrokConfig preset name or a config.json path
    seed: int = 0  # weights, data order and RNG all follow from it
    batch_size: int = 8  # sequences per rank per micro-step
    seq_len: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine ends here (nanoGPT: about lr / 10)
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    aux_loss_coef: float = 0.01  # load balancing (Switch Transformer's alpha)
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE uses 1e-3)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (fsdp.apply_compile)
    # the experts' down-projection: "f32" (the reference's) or "bf16" (faster; grok1.model.moe_ref)
    expert_down: str = "f32"
    # the attention's kernel: "plain" (the reference's rounding) or "flex" (torch's
    # flex_attention, fused, f32 scores: faster, a GPU's; grok1.model.attention_flex)
    attention: str = "plain"
    parallel: str = "auto"  # auto (fsdp when several ranks), fsdp, ddp, none
    device: str | None = None  # default: cuda if available
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    peak_tflops: float | None = None  # default: from the GPU's name; MFU is left out if unknown
    watchdog_s: float = 900.0  # exit non-zero when no step finishes for this long; 0 = off
    max_bad_steps: int = 3  # consecutive non-finite steps before rolling back to a checkpoint
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # also write TensorBoard events when it is installed

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "save_every",
                     "eval_every", "eval_batches", "log_every", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be positive")
        if self.keep_checkpoints < 2:
            raise ConfigError(f"keep_checkpoints={self.keep_checkpoints}: need >= 2")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr={self.min_lr}: must be in [0, lr={self.lr}]")
        if self.parallel not in ("auto", "fsdp", "ddp", "none"):
            raise ConfigError(f"parallel={self.parallel!r}: expected auto, fsdp, ddp or none")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"attention={self.attention!r}: expected one of "
                              f"{', '.join(ATTENTION_KERNELS)}")
        if self.expert_down not in EXPERT_DOWN:
            raise ConfigError(f"expert_down={self.expert_down!r}: expected one of "
                              f"{', '.join(EXPERT_DOWN)}")


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, cosine decay to cfg.min_lr at max_steps, then flat."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
