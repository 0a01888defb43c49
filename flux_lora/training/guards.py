"""Callbacks that keep a run honest: stop at the first non-finite loss or gradient, and stop cleanly on a signal.

The finiteness guard records its flags on the device and reads them once per logging interval and before every
save (no host sync per step); the signal stop decides on every rank together, so one rank's signal stops all
ranks at the same step instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import lightning as L
import torch
from torch.nn.utils import get_total_norm

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


class _StoppedOutsideSteps(StoppedBySignal):
    def __init__(self, signum: int):
        Exception.__init__(self, "stopped before the first step of this run; rerun the same command to resume")
        self.signum, self.step = signum, 0


@contextmanager
def stop_outside_steps() -> Iterator[None]:
    """SIGTERM and SIGINT outside the training steps (scan, cache fill, model load) raise
    :class:`StoppedBySignal` (exit 143 / 130 with its message) instead of dying silently (SIGTERM) or
    Lightning's exit 1 (Ctrl-C). During the steps :class:`StopOnSignal` stops after the current one."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _StoppedOutsideSteps(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _describe(batch: dict[str, Any] | None) -> str:
    if not batch:
        return "batch unknown"
    images = ", ".join(map(str, batch.get("image", []))) or "?"
    captions = "; ".join(repr(c) for c in batch.get("caption", [])) or "?"
    return f"images: {images}; captions: {captions}"


class FiniteGuard(L.Callback):
    """Stops the run with :class:`NonFiniteLossError` naming the first step (and its images and captions) whose loss
    or adapter gradient was not finite, so no NaN reaches a checkpoint or a LoRA file.

    Nothing is read on the host per step: each micro-batch's flag is folded into one device tensor, and
    :meth:`check` reads it every ``every_n_steps`` steps, at the last step and before every save (the savers call
    :func:`check_finite`). An optimizer step whose loss or gradient is not finite applies a zero gradient instead
    (``masked_fill_`` on the device), so the adapters stay finite until the check. (With ``16-mixed`` the
    gradient scaler skips inf steps itself, so gradients are neither checked nor zeroed there.)"""

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = max(every_n_steps, 1)
        self._batch: dict[str, Any] | None = None
        self._pending: list[tuple[int, str, dict[str, Any] | None]] = []  # (step, what, batch) per recorded flag
        self._first_bad: torch.Tensor | None = None  # 1 + index into _pending of the first bad flag, else 0
        self._step_bad: torch.Tensor | None = None  # this optimizer step's loss or gradient was not finite
        self._checked_at = self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # the names only: holding the batch would keep its tensors alive until the check
        self._batch = {k: batch.get(k, []) for k in ("image", "caption")} if isinstance(batch, dict) else None

    def _record(self, trainer: L.Trainer, bad: torch.Tensor, what: str) -> None:
        self._pending.append((trainer.global_step + 1, what, self._batch))
        first = torch.zeros((), dtype=torch.int64, device=bad.device) if self._first_bad is None else self._first_bad
        self._first_bad = torch.where((first == 0) & bad, len(self._pending), first)
        self._step_bad = bad if self._step_bad is None else self._step_bad | bad

    def on_before_backward(self, trainer: L.Trainer, module: L.LightningModule, loss: torch.Tensor) -> None:
        self._record(trainer, ~torch.isfinite(loss.detach()).all(), "loss")

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        if grads and not str(trainer.precision).startswith("16"):
            self._record(trainer, ~torch.isfinite(get_total_norm(grads, float("inf"))), "adapter gradient")
            bad = self._step_bad
            assert bad is not None  # set by _record
            for g in grads:  # skip the update on the device: a zero gradient instead of a non-finite one
                g.masked_fill_(bad, 0.0)
        self._step_bad = None

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # mid gradient accumulation: no optimizer step in this batch
            return
        self._last_step = step
        if step % self.every_n_steps == 0 or step >= trainer.max_steps:
            self.check(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Read the flags recorded since the last check (one host sync; call on every rank); raise on a bad one."""
        if self._checked_at == trainer.global_step and not self._pending:
            return
        self._checked_at = trainer.global_step
        first = int(self._first_bad) if self._first_bad is not None else 0
        if not trainer.strategy.reduce_boolean_decision(first > 0, all=False):
            self._pending, self._first_bad = [], None
            return
        step, what, batch = self._pending[first - 1] if first else (trainer.global_step, "loss or gradient", None)
        where = _describe(batch) if first else "on another rank"
        raise NonFiniteLossError(
            f"non-finite {what} at step {step} ({where}); that update was skipped, the run stopped at step "
            f"{trainer.global_step} and nothing was written since. Check those images, the learning rate, or a damaged "
            "checkpoint"
        )


def check_finite(trainer: L.Trainer) -> None:
    """Run the :class:`FiniteGuard` check of ``trainer`` now (before a save), if it has one."""
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, FiniteGuard):
            callback.check(trainer)


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

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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
