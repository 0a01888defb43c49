"""Pieces of the trainer in isolation: targets, optimizers, the command line (schedules: test_schedules.py)."""

import logging
from pathlib import Path

import pytest
import torch

from flux_lora.config import LoraConfig, TrainConfig
from flux_lora.lora.peft_adapters import inject_lora, select_targets
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.training.module import FluxLoraModule
from flux_lora.training.optimizers import import_class
from train import main as train_main

ROOT = Path(__file__).parents[1]


def test_default_targets_are_the_304_block_linears():
    with torch.device("meta"):
        model = Flux(PRESETS["flux-dev"])
    targets = select_targets(model, LoraConfig().targets)
    assert len(targets) == 304 and all(t.startswith(("double_blocks.", "single_blocks.")) for t in targets)
    assert len(select_targets(model, ["*.img_attn.qkv", "*.linear1"])) == 19 + 38
    with pytest.raises(ValueError, match=r"lora.targets entry '\*.qkvv' matches no Linear layer"):
        select_targets(model, ["*.qkvv"])


def test_rank_alpha_and_rslora_scales():
    model = Flux(PRESETS["tiny"])
    inject_lora(model, LoraConfig(rank=4, alpha=8, targets=["*.linear2"], use_rslora=True))
    layer = model.single_blocks[0].linear2
    assert layer.scaling["default"] == pytest.approx(8 / 2)  # alpha / sqrt(rank)
    assert layer.lora_A["default"].weight.shape == (4, layer.in_features)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # default init: the LoRA starts as a no-op


def test_optimizer_by_class_path():
    module = FluxLoraModule(
        lambda device: None, LoraConfig(), TrainConfig(optimizer="torch.optim.SGD", optimizer_args={"momentum": 0.9})
    )
    module.dit = Flux(PRESETS["tiny"])
    inject_lora(module.dit, LoraConfig(rank=2, alpha=2, targets=["*.linear1"]))
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 2 * 2 * (64 + 7 * 64)
    with pytest.raises(ValueError, match="torch.optim.Adamm"):
        import_class("torch.optim.Adamm")


def test_train_py_reports_bad_config_and_data_before_loading_models(tmp_path, monkeypatch, caplog):
    """train.py's ``main(argv)`` in-process (its one run as a script is in test_entry_points.py)."""
    monkeypatch.chdir(tmp_path)  # where relative outputs of the config would land
    with caplog.at_level(logging.INFO):  # what train.py logs to stderr
        assert train_main(["--config", str(ROOT / "configs/tiny.yaml"), "--lora.rnak", "4"]) == 2
    assert "did you mean 'lora.rank'" in caplog.text
    caplog.clear()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    args = ["--data.source", str(tmp_path / "imgs"), "--model.source", str(tmp_path / "no-model")]
    with caplog.at_level(logging.INFO):  # what train.py logs to stderr
        assert train_main(["--config", str(ROOT / "configs/tiny.yaml"), *args]) == 2
    assert "a.png" in caplog.text and not (tmp_path / "no-model").exists()  # nothing was loaded or written
