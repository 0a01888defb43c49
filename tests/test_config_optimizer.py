"""The optimizer and its arguments are checked when the config loads, before any data or model is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux_lora.config import load_config
from flux_lora.config_io import ConfigError

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.optimizer=torch.optim.AdamWW", r"train.optimizer 'torch.optim.AdamWW' cannot be imported"),
        ("--train.optimizer=torch.nn.Linear", r"not a torch.optim.Optimizer"),
        ("--train.optimizer_args={betas: [0.9]}", r"train.optimizer_args .* not accepted .*IndexError"),
        ("--train.optimizer_args={momentum_x: 1}", r"train.optimizer_args .* not accepted .*momentum_x"),
        ("--train.optimizer_args={eps: -1.0}", r"train.optimizer_args .* not accepted"),
    ],
)
def test_bad_optimizer_settings_fail_at_load(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(ROOT / "configs/tiny.yaml", [override])


def test_good_optimizer_settings_load():
    cfg = load_config(
        ROOT / "configs/tiny.yaml", ["--train.optimizer=torch.optim.SGD", "--optimizer_args={momentum: 0.9}"]
    )
    assert cfg.train.optimizer_args == {"momentum": 0.9}
