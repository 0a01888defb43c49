"""Learning-rate schedules from transformers.get_scheduler: the lr at known steps, and the same after a resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from flux_lora.config import TrainConfig
from flux_lora.training.schedules import build_scheduler

from helpers.training import fit, tiny_config

WARM, TOTAL = 2, 10


def _lrs(name: str, steps: int = TOTAL + 1, **kw) -> list[float]:
    cfg = TrainConfig(lr_scheduler=name, learning_rate=2.0, warmup_steps=WARM, max_steps=TOTAL, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = build_scheduler(cfg, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _cos(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    ("name", "kw", "expected"),
    [
        ("constant", {}, lambda s: 1.0),  # warm-up applies to constant too
        ("constant_with_warmup", {}, lambda s: 1.0),
        ("linear", {}, lambda s: (TOTAL - s) / (TOTAL - WARM)),
        ("cosine", {}, lambda s: _cos((s - WARM) / (TOTAL - WARM))),
        ("cosine", {"min_lr_ratio": 0.1}, lambda s: 0.1 + 0.9 * _cos((s - WARM) / (TOTAL - WARM))),
        ("cosine_with_restarts", {"lr_cycles": 2}, lambda s: _cos((2 * (s - WARM) / (TOTAL - WARM)) % 1.0)),
        ("polynomial", {"min_lr_ratio": 0.25, "lr_power": 2.0}, lambda s: 0.25 + 0.75 * ((TOTAL - s) / 8) ** 2),
    ],
)
def test_lr_at_known_steps(name, kw, expected):
    lrs = _lrs(name, **kw)
    assert lrs[:WARM] == pytest.approx([2.0 * s / WARM for s in range(WARM)])  # linear warm-up from 0
    assert lrs[WARM:TOTAL] == pytest.approx([2.0 * expected(s) for s in range(WARM, TOTAL)])


def test_constant_without_warmup_is_flat():
    cfg = TrainConfig(lr_scheduler="constant", learning_rate=2.0, max_steps=TOTAL)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(cfg, opt)
    for _ in range(TOTAL):
        assert opt.param_groups[0]["lr"] == 2.0
        opt.step()
        sched.step()


class LrProbe(L.Callback):
    """The lr each optimizer step of a real fit used; stops after ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.lrs = stop_at, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def test_cosine_lr_continues_exactly_after_resume(tmp_path, tiny_dev_dir):
    args = ["--max_steps=6", "--warmup_steps=2", "--lr_scheduler=cosine", "--learning_rate=1e-3"]
    cfg = tiny_config(tmp_path, tiny_dev_dir, *args, "--train.checkpoint_every_n_steps=3")
    first, second = LrProbe(stop_at=3), LrProbe()
    fit(cfg, first)
    fit(cfg, second)
    expected = [0.0, 5e-4] + [1e-3 * _cos((s - 2) / 4) for s in range(2, 6)]
    assert first.lrs + second.lrs == pytest.approx(expected, abs=1e-12)
