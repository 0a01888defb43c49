"""One training run: config -> data check -> model files -> cache (then encoders released) -> LoRA training.

``run(cfg)`` is what ``train.py`` calls. Order matters for memory: the data is scanned before any model is
loaded (bad input fails in seconds), the Lightning data module fills the embedding/latent cache and releases the
encoders in ``prepare_data``, and the DiT is built only afterwards, in the module's ``configure_model``.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flux_lora.config import ExperimentConfig, save_config
from flux_lora.data.datamodule import FluxDataModule
from flux_lora.data.scan import apply_trigger, scan_all
from flux_lora.dtypes import DTYPES
from flux_lora.lora.files import read_lora
from flux_lora.model.flux import Flux
from flux_lora.training.callbacks import AtomicCheckpointIO, SampleImages, SaveLora, dataset_metadata
from flux_lora.training.ema import AdapterEma
from flux_lora.training.module import FluxLoraModule
from flux_lora.weights import hub
from flux_lora.weights.loading import flux_params, load_autoencoder, load_flow_model
from flux_lora.weights.tiny import write_tiny_model

log = logging.getLogger(__name__)


def compute_dtype(cfg: ExperimentConfig, accelerator: str) -> torch.dtype:
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    return torch.float32 if accelerator == "cpu" else torch.bfloat16


def resolve_accelerator(cfg: ExperimentConfig) -> str:
    acc = cfg.train.accelerator
    if acc == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return acc


def fetch_model_folder(cfg: ExperimentConfig) -> Path:
    """The local model folder: written (tiny) or downloaded (Hugging Face or ModelScope) when needed. In DDP,
    processes other than the first of a node reuse what the first one fetched instead of downloading again."""
    m = cfg.model
    if m.tiny_if_missing and not Path(m.source).exists():
        log.info("writing a tiny random FLUX model to %s (model.tiny_if_missing)", m.source)
        write_tiny_model(m.source, variant=m.tiny_variant)
    return hub.resolve_model(
        m.source,
        hub=m.hub,
        revision=m.revision,
        cache_dir=m.cache_dir,
        local_files_only=int(os.environ.get("LOCAL_RANK", "0")) > 0,
    )


def build(cfg: ExperimentConfig) -> tuple[L.Trainer, FluxLoraModule, FluxDataModule]:
    """Everything ``trainer.fit`` needs, nothing loaded yet but the data scan."""
    scanned = scan_all(cfg.data)  # bad data fails here, before any model is touched
    prompts = sample_prompts(cfg)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    folder = fetch_model_folder(cfg)
    params = flux_params(cfg.model.preset or folder)
    accelerator = resolve_accelerator(cfg)
    dtype = compute_dtype(cfg, accelerator)
    out = cfg.output_path

    datamodule = FluxDataModule.from_model_folder(
        cfg.data, folder, params.max_sequence_length, dtype, sample_prompts=prompts, scanned=scanned
    )
    initial = partial(read_lora, cfg.train.init_lora, plain=True) if cfg.train.init_lora else None
    module = FluxLoraModule(
        partial(_load_for_training, cfg, folder, dtype),
        cfg.lora,
        cfg.train,
        initial_lora=initial,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        compile=cfg.model.compile,
    )
    metadata = dataset_metadata(scanned, [d.source for d in cfg.data.dataset_configs()])
    saver = SaveLora(cfg, cfg.train.save_every_n_steps, metadata)
    ema = AdapterEma(cfg.ema, saver) if cfg.ema.enabled else None
    callbacks: list[L.Callback] = [
        *([ema] if ema else []),  # first: a step's samples and checkpoint see its EMA update
        # last.ckpt plus the two newest periodic checkpoints (each holds adapters and optimizer state)
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.train.checkpoint_every_n_steps or None,
            save_last=True,
            monitor="step",
            mode="max",
            save_top_k=2,
        ),
        saver,
    ]
    if cfg.sample.prompts:
        callbacks.append(
            SampleImages(
                datamodule.sample_embeddings,
                partial(_load_ae, folder, dtype),
                cfg.sample,
                out / "samples",
                weights=ema.applied if ema and cfg.ema.use_for_samples else None,
            )
        )
    precision = cfg.train.precision
    if precision == "auto":
        precision = "32-true" if accelerator == "cpu" else "bf16-mixed"
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=_devices(cfg.train.devices),
        num_nodes=cfg.train.num_nodes,
        strategy=cfg.train.strategy,
        precision=precision,
        max_steps=cfg.train.max_steps,
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        gradient_clip_val=cfg.train.gradient_clip,
        log_every_n_steps=cfg.train.log_every_n_steps,
        default_root_dir=out,
        callbacks=callbacks,
        logger=_logger(out, cfg.name),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    return trainer, module, datamodule


def sample_prompts(cfg: ExperimentConfig) -> list[str]:
    """The preview prompts with ``data.trigger_word`` applied as to every caption."""
    return [apply_trigger(p, cfg.data.trigger_word, f"sample prompt {p!r}") for p in cfg.sample.prompts]


def _load_for_training(cfg: ExperimentConfig, folder: Path, dtype: torch.dtype, device: torch.device) -> Flux:
    return load_flow_model(
        folder,
        cfg.model.preset,
        dtype=dtype,
        device=device,
        quantize=cfg.model.quantize,
        quant_policy=cfg.model.quant_policy,
    )


def _load_ae(folder: Path, dtype: torch.dtype, device: torch.device):
    return load_autoencoder(folder, dtype=dtype, device=device)


def _devices(value: str) -> int | str | list[int]:
    if value == "auto":
        return "auto"
    if "," in value:
        return [int(v) for v in value.split(",") if v]
    return int(value) if value.lstrip("-").isdigit() else value


def _logger(out: Path, name: str):
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(out, name="logs", version="")
    except ImportError:
        from lightning.pytorch.loggers import CSVLogger

        log.info("tensorboard is not installed: logging to CSV")
        return CSVLogger(out, name="logs", version="")


def last_checkpoint(cfg: ExperimentConfig) -> Path | None:
    path = cfg.output_path / "checkpoints" / "last.ckpt"
    return path if cfg.train.resume and path.is_file() else None


def run(cfg: ExperimentConfig) -> Path:
    """Train, and return the path of the final LoRA file."""
    trainer, module, datamodule = build(cfg)
    if trainer.is_global_zero:
        save_config(cfg, cfg.output_path / "config.yaml")
    ckpt = last_checkpoint(cfg)
    if ckpt:
        log.info("resuming from %s", ckpt)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    return cfg.output_path / f"{cfg.name}.safetensors"
