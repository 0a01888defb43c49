"""What a run logs besides the loss: the logger (``train.logger``), the gradient norm before clipping, throughput
(images/s and tokens/s of each optimizer step's batches) and, on CUDA, peak memory (logged by the module)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

log = logging.getLogger(__name__)


def make_logger(kind: str, out: Path, name: str, hparams: dict[str, Any] | None = None) -> Logger:
    """Lightning's TensorBoard (falling back to CSV, announced, when tensorboard is missing), CSV or W&B logger,
    writing under ``out``, with ``hparams`` (the resolved config) as its hyperparameters (``hparams.yaml``). W&B
    honours its own settings (``WANDB_MODE=offline``, ``WANDB_PROJECT``)."""
    logger = _make_logger(kind, out, name)
    if hparams:
        logger.log_hyperparams(hparams)
    return logger


def _make_logger(kind: str, out: Path, name: str) -> Logger:
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("train.logger wandb needs the wandb package: pip install wandb") from None
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(name=name, project="flux-lora", save_dir=str(out))
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(out, name="logs", version="")
        except ImportError:
            log.warning("tensorboard is not installed: logging to CSV in %s (pip install tensorboard)", out / "logs")
    return CSVLogger(out, name="logs", version="")


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of all trainable parameters' gradients together, on their device (not read on the host)."""
    grads = [p.grad.detach() for p in module.parameters() if p.requires_grad and p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros(())


class TrainingMetrics(L.Callback):
    """Logs ``train/grad_norm`` (before clipping), ``train/images_per_s`` and ``train/tokens_per_s`` (image plus
    text tokens through the DiT) of each optimizer step."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._images = self._tokens = 0
        self._step = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        b, _, h, w = batch["latents"].shape
        self._images += b
        self._tokens += b * ((h // 2) * (w // 2) + batch["txt"].shape[1])

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        module.log("train/grad_norm", grad_norm(module))

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._start is None or self._step == step:  # no optimizer step in this batch (accumulation)
            return
        self._step = step
        seconds = max(time.perf_counter() - self._start, 1e-9)
        module.log("train/images_per_s", self._images / seconds)
        module.log("train/tokens_per_s", self._tokens / seconds)
        self._start, self._images, self._tokens = None, 0, 0
