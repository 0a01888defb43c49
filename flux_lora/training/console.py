"""What a person watching a run reads: one progress bar over the whole run (or plain log lines when stderr is
not a terminal), start and end summaries, and third-party noise filtered out."""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

from flux_lora.training.events import EventLog

if TYPE_CHECKING:
    from flux_lora.config import ExperimentConfig

log = logging.getLogger(__name__)

# Messages of other libraries that say nothing about this run (checked against each record's message).
NOISE = (
    "Tip: For seamless cloud logging",  # Lightning's litlogger advertisement
    "TPU available:",
    "is smaller than the logging interval",  # wrong for a step-based run: logging does happen
    "isinstance(treespec, LeafSpec)",
    "exists and is not empty",  # our own checkpoint folder, on every resume
    "does not have many workers",  # the dataset reads cached tensors only
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in NOISE)


def quiet_third_party() -> None:
    """Filter :data:`NOISE` from warnings and from the handlers of the root logger (call after it is set up)."""
    for text in NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropNoise())
    # transformers' own bars ("Loading weights", "Writing model shards") for the tiny encoders and the text
    # encoders: our cache has its own bar, and these flood redirected logs
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class StepProgress(ProgressBar):
    """Global step k of ``max_steps`` with steps/s, the whole run's ETA, smoothed loss and learning rate: a bar
    on a terminal, a log line every ``every_n_steps`` steps (or ``every_s`` seconds) otherwise.

    The loss is smoothed on the device and read on the host only when shown (every ``every_n_steps`` steps, or
    ``every_s`` seconds without a terminal): reading it every step would make the host wait for the
    accelerator each step."""

    def __init__(
        self,
        every_n_steps: int = 10,
        every_s: float = 60.0,
        interactive: bool | None = None,
        events: EventLog | None = None,
    ):
        super().__init__()
        self.events = events  # gets a ``step`` event with each shown line's figures
        self.every_n_steps, self.every_s = max(every_n_steps, 1), every_s
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._enabled = True
        self.bar: tqdm | None = None
        self.smoothed: float | None = None  # as last read from the device
        self.first_loss: float | None = None
        self._smoothed: torch.Tensor | None = None
        self._first: torch.Tensor | None = None
        self.start_step = 0
        self._last_step = 0
        self._last_line = 0.0
        self._started = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start_step = self._last_step = trainer.global_step
        self._started = self._last_line = time.monotonic()
        if self._enabled and self.interactive and trainer.is_global_zero:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="training", unit="step")

    def _smooth(self, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        if self._smoothed is None:
            self._first, self._smoothed = value, value.clone()
        else:
            self._smoothed.lerp_(value, 0.1)  # 0.9 * smoothed + 0.1 * loss, on the device

    def read_loss(self) -> None:
        """Fetch the smoothed (and, once, the first) loss from the device: a host sync, once per shown line."""
        if self._first is not None and self.first_loss is None:
            self.first_loss = float(self._first)
        if self._smoothed is not None:
            self.smoothed = float(self._smoothed)

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._smooth(loss)
        step = trainer.global_step
        if step == self._last_step or not self._enabled or not trainer.is_global_zero:
            self._last_step = step
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        if self.bar is not None:
            self.bar.update(step - self._last_step)
            if self._due(trainer, step, interactive=True):
                self.read_loss()
                self.bar.set_postfix(loss=f"{self.smoothed:.4f}", lr=f"{lr:.2e}", refresh=False)
                self._emit(trainer, step, lr, self._rate(step))
        elif self._due(trainer, step, interactive=False):
            self._log_line(trainer, step, lr)
        self._last_step = step

    def _due(self, trainer: L.Trainer, step: int, interactive: bool) -> bool:
        now = time.monotonic()
        late = not interactive and now - self._last_line >= self.every_s
        if step % self.every_n_steps == 0 or late or step >= trainer.max_steps:
            self._last_line = now
            return True
        return False

    def _rate(self, step: int) -> float:
        return (step - self.start_step) / max(time.monotonic() - self._started, 1e-9)

    def _emit(self, trainer: L.Trainer, step: int, lr: float, rate: float) -> None:
        """The ``step`` event: the figures of the line just shown (the loss already read for it)."""
        if self.events is None:
            return
        self.events.emit(
            "step",
            step=step,
            loss=self.smoothed,
            lr=float(lr),
            steps_per_s=rate if rate > 0 else None,
            eta_s=(trainer.max_steps - step) / rate if rate > 0 else None,
        )

    def _log_line(self, trainer: L.Trainer, step: int, lr: float) -> None:
        self.read_loss()
        rate = self._rate(step)
        eta = _eta((trainer.max_steps - step) / rate) if rate > 0 else "?"
        self._emit(trainer, step, lr, rate)
        log.info(
            "step %d/%d  loss %.4f (smoothed)  lr %.2e  %.2f steps/s  ETA %s",
            step,
            trainer.max_steps,
            self.smoothed if self.smoothed is not None else float("nan"),
            lr,
            rate,
            eta,
        )

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.read_loss()  # the end summary's figures
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, module)


def start_summary(cfg: ExperimentConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: Any) -> str:
    """One paragraph: model and source, quantization, trainable parameters, images and buckets, steps, output."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    plan = getattr(datamodule, "plan", None)
    buckets = Counter(f"{w}x{h}" for w, h in plan.buckets) if plan is not None else Counter()
    per_bucket = ", ".join(f"{b}: {n}" for b, n in sorted(buckets.items()))
    return (
        f"training {cfg.name}: model {cfg.model.source} ({cfg.model.quantize or 'not quantized'}), LoRA rank "
        f"{cfg.lora.rank} ({trainable:,} trainable parameters), {len(plan.captions) if plan else 0} images in "
        f"{len(buckets)} buckets ({per_bucket}), batch {cfg.data.batch_size}, steps {trainer.global_step} -> "
        f"{trainer.max_steps}, {_speed(module)}, output {cfg.output_dir}"
    )


def _speed(module: L.LightningModule) -> str:
    on = [
        name
        for name, flag in (
            ("compiled blocks", getattr(module, "use_compile", False)),
            ("fp8 GEMMs", getattr(module, "fp8_matmul", False)),
            ("selective checkpointing", getattr(module, "selective_checkpointing", False)),
        )
        if flag
    ]
    checkpointing = "checkpointing" if getattr(module, "gradient_checkpointing", False) else "no checkpointing"
    return ", ".join([checkpointing, *on]) if on else f"{checkpointing}, eager"


class Summaries(L.Callback):
    """Logs :func:`start_summary` when training starts (rank 0)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("%s", start_summary(self.cfg, trainer, module, getattr(trainer, "datamodule", None)))
