"""The tiny training run: its config (configs/tiny.yaml on a given model folder, everything under one
directory) and a fit that resumes from the run's last checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from flux_lora.config import ExperimentConfig, load_config
from flux_lora.training.module import FluxLoraModule
from flux_lora.training.run import build, last_checkpoint

ROOT = Path(__file__).parents[2]


def tiny_config(tmp_path: Path, model_dir: Path, *overrides: str) -> ExperimentConfig:
    """configs/tiny.yaml on ``model_dir``, writing run, cache and logs under ``tmp_path``, on one CPU, with no
    preview samples; ``overrides`` as on train.py's command line."""
    return load_config(
        ROOT / "configs/tiny.yaml",
        [
            f"--model.source={model_dir}",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.source={ROOT / 'examples/data'}",
            "--train.log_every_n_steps=1",
            "--sample.prompts=[]",
            "--train.accelerator=cpu",
            "--train.devices=1",
            *overrides,
        ],
    )


def fit(cfg: ExperimentConfig, *callbacks: L.Callback) -> tuple[L.Trainer, FluxLoraModule]:
    """Build the run of ``cfg`` and fit it, from its last checkpoint if there is one."""
    trainer, module, datamodule = build(cfg)
    for cb in callbacks:
        trainer.callbacks.append(cb)
    trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint(cfg))
    return trainer, module
