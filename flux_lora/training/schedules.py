"""Learning-rate schedules from ``transformers.get_scheduler``, stepped once per optimizer step.

The schedulers are ``LambdaLR`` objects over ``functools.partial`` lambdas: their state is the step count, which
Lightning checkpoints, so a resumed run continues the curve exactly.
"""

from __future__ import annotations

import torch
from transformers import get_scheduler

from flux_lora.config import TrainConfig


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """``train.lr_scheduler`` with ``warmup_steps`` (constant too) over ``max_steps``; cosine and polynomial end at
    ``learning_rate * min_lr_ratio``, cosine_with_restarts restarts ``lr_cycles`` times."""
    name: str = cfg.lr_scheduler
    extra: dict[str, float] = {}
    if name == "constant" and cfg.warmup_steps > 0:
        name = "constant_with_warmup"
    elif name == "cosine" and cfg.min_lr_ratio > 0:
        name, extra = "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}
    elif name == "cosine_with_restarts":
        extra = {"num_cycles": cfg.lr_cycles}
    elif name == "polynomial":
        extra = {"lr_end": cfg.learning_rate * cfg.min_lr_ratio, "power": cfg.lr_power}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
        scheduler_specific_kwargs=extra or None,
    )
