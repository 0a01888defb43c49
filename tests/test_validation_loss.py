"""Validation loss: held-out images scored at fixed timesteps with fixed noise, every N steps."""

from __future__ import annotations

import shutil

import pytest

from flux_lora.config import ValidationConfig
from flux_lora.training.validation import ValidationLoss

from helpers.training import fit, tiny_config

ARGS = ["--max_steps=4", "--validation.fraction=0.25", "--validation.every_n_steps=2", "--train.logger=csv"]


def _validation(trainer) -> ValidationLoss:
    return next(cb for cb in trainer.callbacks if isinstance(cb, ValidationLoss))


def test_held_out_fraction_is_scored_every_n_steps_and_bit_identical_across_runs(tmp_path, tiny_dev_dir):
    a_cfg = tiny_config(tmp_path / "a", tiny_dev_dir, *ARGS)
    a, module = fit(a_cfg)
    val = _validation(a)
    held = set(val.data._require_plan().names)
    trained = set(a.datamodule.plan.names)
    assert len(held) == 2 and len(trained) == 6 and held.isdisjoint(trained)  # 8 images, a quarter held out
    assert [s for s, _ in val.history] == [2, 4] and val.history[0][1] != val.history[1][1]
    assert val.evaluate(module) == val.history[-1][1]  # same weights, same number, bit for bit
    b_cfg = tiny_config(tmp_path / "b", tiny_dev_dir, *ARGS)
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")
    b, _ = fit(b_cfg)
    assert _validation(b).history == val.history  # a second run of the same training: identical curve
    logged = (a_cfg.output_path / "logs" / "metrics.csv").read_text()
    assert "val/loss" in logged.splitlines()[0]


def test_bad_validation_options_fail_at_config_time():
    with pytest.raises(ValueError, match="validation: set source or fraction, not both"):
        ValidationConfig(source="x", fraction=0.1)
    with pytest.raises(ValueError, match=r"validation.timesteps must be flow times in \(0, 1\]"):
        ValidationConfig(timesteps=[0.0])
    assert not ValidationConfig(fraction=0.1).enabled and ValidationConfig(fraction=0.1, every_n_steps=5).enabled
