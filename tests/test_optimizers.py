"""Optimizers by name: each takes a step that changes the adapters; a missing package is a one-line config error;
Prodigy's learning-rate advice; schedule-free's evaluation weights around sampling and saving."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from flux_lora.config import OPTIMIZERS, TrainConfig, load_config
from flux_lora.config_io import ConfigError
from flux_lora.lora.peft_adapters import trainable_parameters
from flux_lora.model.flux import PRESETS
from flux_lora.training.optimizers import build_optimizer, eval_weights, is_schedule_free

from helpers.dit import dit_inputs, lora_dit


def _step(
    name: str, steps: int = 1, **args
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.optim.Optimizer]:
    """``steps`` optimizer steps of a tiny LoRA-DiT: (adapters before, adapters after, optimizer)."""
    dit = lora_dit(PRESETS["tiny"], rank=2, quantize=False, random_b=True)
    lr = 1.0 if name == "prodigy" else 1e-3
    opt = build_optimizer(TrainConfig(optimizer=name, learning_rate=lr, optimizer_args=args), trainable_parameters(dit))
    before = {n: p.detach().clone() for n, p in dit.named_parameters() if p.requires_grad}
    for _ in range(steps):
        opt.zero_grad()
        dit(**dit_inputs(dit.params)).square().mean().backward()
        opt.step()
    after = {n: p.detach().clone() for n, p in dit.named_parameters() if p.requires_grad}
    return before, after, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_named_optimizer_step_changes_every_adapter(name):
    package = OPTIMIZERS[name][1]
    if package:
        pytest.importorskip(package)
    before, after, opt = _step(name, weight_decay=0.0) if name != "sgd" else _step(name)
    assert type(opt).__module__.split(".")[0] == OPTIMIZERS[name][0].split(".")[0]
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before) > 0


def test_optimizer_args_pass_through():
    _, _, opt = _step("adamw", betas=(0.5, 0.6), weight_decay=0.25)
    assert opt.defaults["betas"] == (0.5, 0.6) and opt.defaults["weight_decay"] == 0.25


def test_missing_optimizer_package_is_a_one_line_config_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prodigyopt" else real(n, *a))
    with pytest.raises(ValueError, match=r"'prodigy' needs the prodigyopt package: pip install 'flux-lora\[optim\]'"):
        TrainConfig(optimizer="prodigy")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  optimizer: Prodigy\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "flux-lora[optim]" in str(e.value) and "\n" not in str(e.value)


def test_prodigy_warns_unless_lr_is_one(caplog):
    pytest.importorskip("prodigyopt")
    param = [torch.nn.Parameter(torch.zeros(2))]
    with caplog.at_level(logging.WARNING, logger="flux_lora"):
        build_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1.0), param)
        assert "learning_rate 1.0" not in caplog.text
        build_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1e-4), param)
    assert "learning_rate 1.0 is advised" in caplog.text


def test_schedule_free_eval_weights_around_a_block():
    pytest.importorskip("schedulefree")
    _, trained, opt = _step("schedulefree_adamw", steps=3, weight_decay=0.0)  # after one step x = z = y
    assert is_schedule_free(opt) and opt.param_groups[0]["train_mode"]
    params = [p for g in opt.param_groups for p in g["params"]]
    train_values = [p.detach().clone() for p in params]
    with eval_weights(opt):
        assert not opt.param_groups[0]["train_mode"]
        eval_values = [p.detach().clone() for p in params]
    assert any(not torch.equal(a, b) for a, b in zip(train_values, eval_values, strict=True))
    assert opt.param_groups[0]["train_mode"]
    for p, v in zip(params, train_values, strict=True):
        assert torch.equal(p.detach(), v)  # exactly the training weights again
    assert not is_schedule_free(torch.optim.AdamW(params))
