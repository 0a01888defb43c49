"""Optimizers by name (``train.optimizer``) or by import path, with the documented quirks of two of them handled.

Prodigy estimates the step size itself and expects ``learning_rate`` 1.0 (a warning otherwise). Schedule-free AdamW
trains on one sequence of weights and evaluates another: :func:`eval_weights` switches to the evaluation weights
around sampling and writing LoRA files, and back to the training ones afterwards.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from flux_lora.config import OPTIMIZER_DEFAULT_ARGS, TrainConfig, optimizer_path

log = logging.getLogger(__name__)


def import_class(name: str) -> type:
    """The optimizer class of a ``train.optimizer`` name (``adamw``, ``prodigy``, ...) or import path."""
    path = optimizer_path(name)
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"train.optimizer {name!r} cannot be imported ({e})") from None


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``params`` at ``train.learning_rate`` with ``train.optimizer_args``."""
    name = cfg.optimizer.lower()
    if name == "prodigy" and cfg.learning_rate != 1.0:
        log.warning("prodigy adapts its own step size: train.learning_rate 1.0 is advised, got %s", cfg.learning_rate)
    args = {**OPTIMIZER_DEFAULT_ARGS.get(name, {}), **cfg.optimizer_args}
    optimizer = import_class(cfg.optimizer)(params, lr=cfg.learning_rate, **args)
    if is_schedule_free(optimizer):
        optimizer.train()
    return optimizer


def is_schedule_free(optimizer: object) -> bool:
    """Schedule-free optimizers keep a ``train_mode`` flag per parameter group and switch with train()/eval()."""
    groups = getattr(optimizer, "param_groups", [])
    return bool(groups) and "train_mode" in groups[0] and callable(getattr(optimizer, "eval", None))


@contextmanager
def eval_weights(optimizer: Any) -> Iterator[None]:
    """The parameters hold a schedule-free optimizer's evaluation weights inside the block (no-op otherwise).

    Afterwards the training weights are copied back rather than recomputed by ``train()``, whose interpolation
    does not round-trip exactly: resume and the other DDP ranks see bit-identical weights."""
    if optimizer is None or not is_schedule_free(optimizer) or not optimizer.param_groups[0]["train_mode"]:
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)
        for group in optimizer.param_groups:
            group["train_mode"] = True
