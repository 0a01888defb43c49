"""Logging options: the logger by name (CSV, TensorBoard, W&B offline), gradient norm and throughput."""

from __future__ import annotations

import csv
import importlib.util

import lightning as L
import pytest
import yaml

from flux_lora import config_io
from flux_lora.config import TrainConfig
from flux_lora.training.metrics import grad_norm

from helpers.training import fit, tiny_config


class NormProbe(L.Callback):
    """The gradient norm before each optimizer step and the tokens per image of each batch."""

    def __init__(self):
        self.norms, self.tokens_per_image = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        h, w = batch["latents"].shape[-2:]  # image tokens are 2x2 latent patches, then the text tokens
        self.tokens_per_image.append(h // 2 * w // 2 + batch["txt"].shape[1])

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.norms.append(float(grad_norm(module)))


def _rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_csv_logger_gets_grad_norm_and_throughput(tmp_path, tiny_dev_dir):
    cfg = tiny_config(tmp_path, tiny_dev_dir, "--max_steps=3", "--train.logger=csv", "--gradient_clip=1e-6")
    probe = NormProbe()
    fit(cfg, probe)
    rows = _rows(cfg.output_path / "logs" / "metrics.csv")
    norms = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert norms == pytest.approx(probe.norms, rel=1e-5) and len(norms) == 3
    assert all(n > 1e-6 for n in norms)  # logged before clipping (the clip is 1e-6)
    images = [float(r["train/images_per_s"]) for r in rows if r.get("train/images_per_s")]
    tokens = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    assert len(images) == 3 and all(i > 0 for i in images)
    ratios = [t / i for t, i in zip(tokens, images, strict=True)]
    assert ratios == pytest.approx(probe.tokens_per_image, rel=1e-5)
    # hparams.yaml holds the resolved configuration (it was {})
    assert yaml.safe_load((cfg.output_path / "logs" / "hparams.yaml").read_text()) == config_io.to_dict(cfg)


def test_tensorboard_logger_writes_events(tmp_path, tiny_dev_dir):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, tiny_dev_dir, "--max_steps=1", "--train.logger=tensorboard")
    fit(cfg)
    assert list((cfg.output_path / "logs").glob("events.out.tfevents.*"))
    # hparams.yaml holds the resolved configuration (it was {})
    hparams = yaml.safe_load((cfg.output_path / "logs" / "hparams.yaml").read_text())
    assert hparams == config_io.to_dict(cfg)


def test_wandb_offline_writes_its_run_folder(tmp_path, tiny_dev_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path, tiny_dev_dir, "--max_steps=1", "--train.logger=wandb")
    fit(cfg)
    runs = list((cfg.output_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_missing_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ValueError, match="train.logger wandb needs the wandb package: pip install wandb"):
        TrainConfig(logger="wandb")
