"""Validation loss: held-out images (a folder, or a fraction of the training data) scored every N steps at fixed
flow times with fixed noise, so the curve is comparable across steps and across runs; logged as ``val/loss``.

The held-out images get their own cache plan (same encoders and cache folder), filled in ``setup``, before the
DiT is built, so their encoders never sit beside it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from typing import Any

import lightning as L
import torch

from flux_lora import sampling as S
from flux_lora.config import DataError, ExperimentConfig, ValidationConfig
from flux_lora.data.datamodule import CachedDataset, FluxDataModule, collate
from flux_lora.data.scan import ScannedData, scan
from flux_lora.training.callbacks import _due
from flux_lora.training.loss import StepDraws, dit_inputs, target_tokens, weighted_mse

log = logging.getLogger(__name__)


def split_held_out(scanned: ScannedData, fraction: float) -> tuple[ScannedData, ScannedData]:
    """``(training, held out)``: the records whose content hash falls below ``fraction`` are held out (at least
    one, never all), so the split is the same in every process and run."""
    rank = sorted(scanned.records, key=lambda r: hashlib.sha256(f"val:{r.image_hash}".encode()).hexdigest())
    count = min(max(1, round(fraction * len(rank))), len(rank) - 1)
    if count < 1:
        raise DataError("validation.fraction needs at least two training images")
    held = {id(r) for r in rank[:count]}
    train = [r for r in scanned.records if id(r) not in held]
    return replace(scanned, records=train), replace(scanned, records=[r for r in scanned.records if id(r) in held])


def held_out_data(cfg: ExperimentConfig, scanned: ScannedData) -> tuple[ScannedData, ScannedData | None]:
    """``(training data, held-out data or None)`` as ``cfg.validation`` asks."""
    v = cfg.validation
    if not v.enabled:
        return scanned, None
    if v.source:
        return scanned, scan(replace(cfg.data, source=v.source, datasets=[], repeats=1))
    return split_held_out(scanned, v.fraction)


class ValidationLoss(L.Callback):
    """Scores ``data`` (a data module over the held-out images) every ``cfg.every_n_steps`` steps and at the end."""

    def __init__(self, cfg: ValidationConfig, data: FluxDataModule, guidance: float):
        self.cfg, self.data, self.guidance = cfg, data, guidance
        self.history: list[tuple[int, float]] = []
        self.dataset: CachedDataset | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.data.device = trainer.strategy.root_device
        self.data.prepare_data()  # one process; under DDP every rank fills its share in setup()
        self.data.setup()
        self.dataset = CachedDataset.from_plan(self.data._require_plan(), self.data.reference_plan)

    @torch.no_grad()
    def evaluate(self, module: Any) -> float:
        """The mean loss over every held-out image and timestep (deterministic: fixed noise and times)."""
        assert self.dataset is not None, "setup() first"
        dit, device = module.dit, module.device
        was_training = dit.training
        dit.eval()  # no LoRA dropout
        total, count = 0.0, 0
        try:
            for i in range(len(self.dataset)):
                batch = {k: v.to(device) for k, v in collate([self.dataset[i]]).items() if isinstance(v, torch.Tensor)}
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + i)
                noise = torch.randn(batch["latents"].shape, generator=g)
                guidance = self.guidance if dit.params.guidance_embed else None
                for t in self.cfg.timesteps:
                    draws = StepDraws(S.pack(noise), torch.tensor([t]), None)
                    inputs, target = dit_inputs(batch, draws, guidance, dit.img_in.bias.dtype, None)
                    pred = target_tokens(dit(**inputs), target)
                    loss = weighted_mse(pred, target, draws.t.to(device), "none", batch.get("mask"))
                    total, count = total + float(loss), count + 1
        finally:
            dit.train(was_training)
        return total / count

    def _run(self, trainer: L.Trainer, module: Any) -> None:
        loss = self.evaluate(module)
        self.history.append((trainer.global_step, loss))
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"val/loss": loss}, step=trainer.global_step)
        log.info("step %d: validation loss %.6f", trainer.global_step, loss)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if _due(trainer, self.cfg.every_n_steps, self):
            self._run(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.global_step >= trainer.max_steps:
            self._run(trainer, module)
