"""The trainer row of ``bench_gpu.py``: the step timed through Lightning, as ``train.py`` runs it.

The shipped :class:`~flux_lora.training.module.FluxLoraModule` (random fp8 DiT, rank-16 LoRA, the shipped ``train:``
section) and :class:`~flux_lora.data.datamodule.FluxDataModule` over a cache of the bench size, filled from random
images by the bench's random text encoders and autoencoder (built only to fill the cache, then released), under
``L.Trainer`` with bf16-mixed precision and gradient clipping. A callback synchronises the device at the end of each
batch and records the time since the previous one: the whole ``training_step`` with data loading, host-to-device
copy, backward, clipping, optimizer, scheduler, logging and callbacks. The row sits beside the bare step row of the
same configuration (``trainer_over_bare``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from benchmarks.common import free, peak_gb, random_dit, shipped_train_config, sync
from benchmarks.gpu_models import autoencoder, text_encoders
from flux_lora.config import DataConfig, LoraConfig
from flux_lora.data.cache import AutoEncoderSpec, TextEncoderSpec
from flux_lora.data.datamodule import FluxDataModule
from flux_lora.model.flux import FluxParams
from flux_lora.training.module import FluxLoraModule

IMAGES = 4


class StepClock(L.Callback):
    """Seconds between the ends of consecutive training batches (the first from the start of training), the
    device synchronised at each end."""

    def __init__(self, device: str):
        self.device, self.ends = device, []

    def on_train_start(self, *args: Any) -> None:  # the model is built and on the device
        sync(self.device)
        self.ends = [time.perf_counter()]

    def on_train_batch_end(self, *args: Any) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())

    def times(self, skip: int) -> list[float]:
        """Step times after the first ``skip`` steps."""
        return [b - a for a, b in zip(self.ends[skip:], self.ends[skip + 1 :], strict=False)]


def write_images(folder: Path, res: int, count: int = IMAGES) -> Path:
    """``count`` random ``res`` x ``res`` images with captions (one bucket at the bench size)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a benchmark image {i}")
    return folder


def datamodule(params: FluxParams, device: str, res: int, root: Path, full: bool) -> FluxDataModule:
    """The data module over random images of ``res`` px; its encoders are random (fresh at each load)."""
    cfg = DataConfig(source=str(write_images(root / "data", res)), resolution=res, cache_dir=str(root / "cache"))
    spec = (
        TextEncoderSpec("bench-random", params.max_sequence_length, "bfloat16"),
        AutoEncoderSpec("bench", "bfloat16"),
    )
    return FluxDataModule(
        cfg,
        *spec,
        lambda: text_encoders(params, device, full_size=full),
        lambda: autoencoder(device, "flux" if full else "tiny"),
        device=device,
    )


def trainer_row(params: FluxParams, device: str, config: Any, args: Any, bare: dict | None, rank: int) -> dict:
    """Time ``args.warmup`` (+2 when compiled) then ``args.steps`` steps of ``config`` through ``L.Trainer``."""
    warmup = args.warmup + 2 * config.compiled
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        data = datamodule(params, device, config.res, Path(tmp), full=args.preset == "flux-dev")
        start = time.perf_counter()
        data.prepare_data()  # fill the cache now, so its time is not a step's
        cache_s = time.perf_counter() - start
        free(device)
        module = FluxLoraModule(
            lambda dev: random_dit(params, device=str(dev), quantize="blocks"),
            LoraConfig(rank=rank, alpha=rank),
            shipped_train_config(),
            gradient_checkpointing=config.checkpointing,
            compile=config.compiled,
            fp8_matmul=config.fp8_matmul,
            selective_checkpointing=config.selective,
        )
        clock = StepClock(device)
        trainer = L.Trainer(
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=warmup + args.steps,
            gradient_clip_val=module.train_cfg.gradient_clip,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            callbacks=[clock],
        )
        if config.compiled:
            torch._dynamo.reset()  # a fresh compile, as the bare rows
        trainer.fit(module, datamodule=data)
    times = clock.times(warmup)
    med = statistics.median(times)
    row = dict(
        kind="trainer",
        **vars(config),
        median_s_per_step=med,
        steps_timed=len(times),
        min_s=min(times),
        cache_fill_s=cache_s,
        peak_allocated_GB=peak_gb(device),
        peak_reserved_GB=peak_gb(device, reserved=True),
    )
    if bare and "median_s_per_step" in bare:
        row.update(bare_median_s_per_step=bare["median_s_per_step"], trainer_over_bare=med / bare["median_s_per_step"])
    return row
