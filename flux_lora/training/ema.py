"""Adapter-only EMA: an fp32 exponential moving average of the trainable LoRA weights (not of the frozen base).

Updated after every ``every_n_steps``-th optimizer step (``ema = decay * ema + (1 - decay) * weights``), kept on
the training device or in host memory, stored in Lightning checkpoints (exact resume) and written beside the LoRA
as ``<name>_ema.safetensors`` through the LoRA writer (same layout, metadata and dtype).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch

from flux_lora.config import EmaConfig
from flux_lora.lora.weight import clean_name
from flux_lora.training.callbacks import SaveLora

log = logging.getLogger(__name__)


def _trainable(module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
    return {clean_name(n): p for n, p in module.named_parameters() if p.requires_grad}


class AdapterEma(L.Callback):
    """The EMA of ``module``'s trainable parameters; ``saver`` writes ``<name>_ema.safetensors`` when training
    completes (not when stopped early: resuming continues the EMA from the checkpoint)."""

    def __init__(self, cfg: EmaConfig, saver: SaveLora | None = None):
        self.cfg = cfg
        self.saver = saver
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._last_step = -1

    def _device(self, module: L.LightningModule) -> torch.device:
        return torch.device("cpu") if self.cfg.device == "cpu" else module.device

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        device = self._device(module)
        params = _trainable(module)
        if self.shadow:  # restored from a checkpoint
            if self.shadow.keys() != params.keys():
                raise ValueError("checkpoint's EMA does not match this run's adapters (other lora settings)")
            self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        else:
            self.shadow = {k: p.detach().to(device, torch.float32, copy=True) for k, p in params.items()}
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if step % self.cfg.every_n_steps:
            return
        for k, p in _trainable(module).items():
            ema = self.shadow[k]
            ema.lerp_(p.detach().to(ema.device, torch.float32), 1 - self.cfg.decay)
        self.updates += 1

    @contextmanager
    def applied(self, module: L.LightningModule) -> Iterator[None]:
        """The module's adapters hold the EMA weights inside the block; the trained ones are restored after."""
        params = _trainable(module)
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.saver is not None and self.shadow and trainer.global_step >= trainer.max_steps:
            with self.applied(module):
                path = self.saver.cfg.output_path / f"{self.saver.cfg.name}_ema.safetensors"
                self.saver.write(trainer, module, path, as_trained=False)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.cpu() for k, v in self.shadow.items()}, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow, self.updates = dict(state_dict["shadow"]), int(state_dict["updates"])
