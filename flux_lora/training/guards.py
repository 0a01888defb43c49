"""Callbacks that keep a run honest: stop at the first non-finite loss or gradient, and stop cleanly on a signal.

Both decide together on every rank (one tiny all-reduce per step under DDP), so one rank's bad batch or signal
stops all ranks at the same step instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step, images and captions."""


class StoppedBySignal(Exception):
    """The run stopped on SIGTERM or SIGINT after checkpointing; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped at step {step}; rerun the same command to resume")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _describe(batch: dict | None) -> str:
    if not batch:
        return "batch unknown"
    images = ", ".join(map(str, batch.get("image", []))) or "?"
    captions = "; ".join(repr(c) for c in batch.get("caption", [])) or "?"
    return f"images: {images}; captions: {captions}"


class FiniteGuard(L.Callback):
    """Raises :class:`NonFiniteLossError` before a non-finite loss is back-propagated or a non-finite adapter
    gradient is applied, so no NaN reaches the adapters, a checkpoint or a LoRA file. (With ``16-mixed`` the
    gradient scaler skips inf steps itself, so gradients are not checked there.)"""

    def __init__(self) -> None:
        self._batch: dict | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch if isinstance(batch, dict) else None

    def on_before_backward(self, trainer: L.Trainer, module: L.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        self._check(trainer, bool(torch.isfinite(value).all()), f"loss {value.item():g}")

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        if str(trainer.precision).startswith("16"):
            return
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        self._check(trainer, finite, "adapter gradient")

    def _check(self, trainer: L.Trainer, finite: bool, what: str) -> None:
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        where = _describe(self._batch) if not finite else "on another rank"
        raise NonFiniteLossError(
            f"non-finite {what if not finite else 'loss or gradient'} at step {trainer.global_step + 1} "
            f"({where}); stopped before applying it, nothing was written for this step. Check those images, "
            "the learning rate, or a damaged checkpoint"
        )


class StopOnSignal(L.Callback):
    """On SIGTERM or SIGINT, finish the optimizer step in progress, then end the fit (the checkpoint callback
    saves the step on ``on_train_end``) and let :func:`flux_lora.training.run.run` raise :class:`StoppedBySignal`.
    A second SIGINT interrupts at once. Replaces Lightning's own SIGTERM handler for the duration of training."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_start = 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_start:  # mid gradient accumulation: finish the step first
            return
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            self.signum = self.signum or signal.SIGTERM  # a rank that got no signal follows the one that did
            self.stopped_at = trainer.global_step
            trainer.should_stop = True

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
