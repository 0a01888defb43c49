"""Adapter-only EMA: the closed form after k steps, its file beside the LoRA, and exact resume."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from flux_lora.config import EmaConfig
from flux_lora.lora.weight import clean_name
from flux_lora.training.ema import AdapterEma

from helpers.training import fit, tiny_config

DECAY, EVERY, STEPS = 0.8, 2, 6


class WeightProbe(L.Callback):
    """The trainable weights at the start and after each optimizer step (by step); stops after ``stop_at``."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.weights = stop_at, {}

    def _record(self, trainer, module):
        named = module.named_parameters()
        self.weights[trainer.global_step] = {clean_name(n): p.detach().clone() for n, p in named if p.requires_grad}

    def on_train_start(self, trainer, module):
        self._record(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._record(trainer, module)
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def _ema(trainer) -> AdapterEma:
    return next(cb for cb in trainer.callbacks if isinstance(cb, AdapterEma))


ARGS = [
    f"--max_steps={STEPS}",
    "--ema.enabled=true",
    f"--ema.decay={DECAY}",
    f"--ema.every_n_steps={EVERY}",
    "--ema.device=cpu",
    "--save.dtype=fp32",
    "--train.save_every_n_steps=0",
]


def test_ema_is_the_closed_form_after_k_steps(tmp_path, tiny_dev_dir):
    cfg = tiny_config(tmp_path, tiny_dev_dir, *ARGS)
    probe = WeightProbe()
    trainer, module = fit(cfg, probe)
    w = probe.weights
    k = STEPS // EVERY  # updates at steps 2, 4, 6
    for name, ema in _ema(trainer).shadow.items():
        expected = DECAY**k * w[0][name]
        for i in range(1, k + 1):
            expected = expected + (1 - DECAY) * DECAY ** (k - i) * w[i * EVERY][name]
        assert ema.device.type == "cpu" and ema.dtype == torch.float32
        torch.testing.assert_close(ema, expected, rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(_ema(trainer).shadow[n], w[STEPS][n]) for n in w[STEPS])  # not the weights
    ema_file = load_file(cfg.output_path / "tiny_ema.safetensors")
    lora_file = load_file(cfg.output_path / "tiny.safetensors")
    assert ema_file.keys() == lora_file.keys()
    assert any(not torch.equal(ema_file[k], lora_file[k]) for k in ema_file if "lora_up" in k)
    # the trained weights were restored after writing the EMA file
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), w[STEPS][clean_name(n)])


def test_ema_resumes_exactly(tmp_path, tiny_dev_dir):
    straight = tiny_config(tmp_path / "a", tiny_dev_dir, *ARGS)
    fit(straight)
    resumed = tiny_config(tmp_path / "b", tiny_dev_dir, *ARGS, "--train.checkpoint_every_n_steps=3")
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")
    fit(resumed, WeightProbe(stop_at=3))
    fit(resumed)
    a = load_file(straight.output_path / "tiny_ema.safetensors")
    b = load_file(resumed.output_path / "tiny_ema.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_ema_options_fail_at_config_time():
    with pytest.raises(ValueError, match="ema.decay must be in"):
        EmaConfig(decay=1.0)
    with pytest.raises(ValueError, match="ema.device must be 'gpu' or 'cpu'"):
        EmaConfig(device="tpu")  # type: ignore[arg-type]
