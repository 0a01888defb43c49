"""One training run: config -> data check -> resume check -> model files -> cache (then encoders released) ->
LoRA training.

``run(cfg)`` is what ``train.py`` calls. Order matters for memory and for errors: the data is scanned and the
output folder's previous run compared with this one before any model is loaded (bad input or changed settings
fail in seconds), the Lightning data module fills the embedding/latent cache and releases the encoders in
``prepare_data``, and the DiT is built only afterwards, in the module's ``configure_model``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch

from flux_lora.config import DataError, ExperimentConfig, SamplePrompt, save_config
from flux_lora.data.datamodule import FluxDataModule
from flux_lora.data.scan import ScannedData, apply_trigger, scan_all
from flux_lora.dtypes import DTYPES
from flux_lora.lora.files import read_lora
from flux_lora.model.flux import Flux
from flux_lora.training.callbacks import (
    AtomicCheckpointIO,
    SampleImages,
    SaveLora,
    StepCheckpoint,
    dataset_metadata,
)
from flux_lora.training.console import StepProgress, Summaries
from flux_lora.training.ema import AdapterEma
from flux_lora.training.guards import FiniteGuard, StopOnSignal, StoppedBySignal
from flux_lora.training.metrics import TrainingMetrics, make_logger
from flux_lora.training.module import FluxLoraModule
from flux_lora.training.resume import (
    RunRecord,
    clean_stale_temps,
    compare,
    find_checkpoint,
    move_aside,
    output_lock,
    run_identity,
)
from flux_lora.training.speed import plan_speed
from flux_lora.training.validation import ValidationLoss, held_out_data
from flux_lora.weights import hub
from flux_lora.weights.loading import flux_params, load_autoencoder, load_flow_model
from flux_lora.weights.tiny import write_tiny_model

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def build(
    cfg: ExperimentConfig, scanned: ScannedData | None = None
) -> tuple[L.Trainer, FluxLoraModule, FluxDataModule]:
    """Everything ``trainer.fit`` needs, nothing loaded yet but the data scan (``scanned``, or done here)."""
    scanned = scanned or scan_all(cfg.data, exclude=[cfg.output_path])  # bad data fails here, before any model
    previews = sample_previews(cfg)
    texts = [t for p in previews for t in (p.prompt, p.negative_prompt)] + list(cfg.preservation.prompts)
    if cfg.preservation.per_caption:  # each caption's preservation prompts, cached with it
        lacking = [r.name for r in scanned.records if not cfg.preservation.caption_prompts(r.caption)]
        if lacking:
            raise DataError(
                f"preservation.replace_word {cfg.preservation.replace_word!r} is not in the captions of "
                f"{len(lacking)} images, e.g. {lacking[:3]}: every caption must hold it"
            )
        texts += [t for r in scanned.records for t in cfg.preservation.caption_prompts(r.caption)]
    prompts = list(dict.fromkeys(texts))  # embeddings to cache with the captions
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    folder = fetch_model_folder(cfg)
    params = flux_params(cfg.model.preset or folder)
    accelerator = resolve_accelerator(cfg)
    dtype = compute_dtype(cfg, accelerator)
    cuda = accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    speed = plan_speed(cfg.model, torch.cuda.get_device_capability(0) if cuda else None)
    out = cfg.output_path

    scanned, held_out = held_out_data(cfg, scanned)
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
        compile=speed.compile,
        selective_checkpointing=speed.selective_checkpointing,
        fp8_matmul=speed.fp8_matmul,
        blocks_to_swap=speed.blocks_to_swap,
        preservation=cfg.preservation,
    )
    metadata = dataset_metadata(scanned, [d.source for d in cfg.data.dataset_configs()])
    saver = SaveLora(cfg, cfg.train.save_every_n_steps, metadata)
    ema = AdapterEma(cfg.ema, saver) if cfg.ema.enabled else None
    callbacks: list[L.Callback] = [
        FiniteGuard(cfg.train.log_every_n_steps),  # first: its interval check precedes the step's saves
        *([ema] if ema else []),  # first: a step's samples and checkpoint see its EMA update
        # the two newest step checkpoints, the last step always among them (adapters and optimizer state)
        StepCheckpoint(out / "checkpoints", cfg.train.checkpoint_every_n_steps, cfg.save.keep_checkpoints),
        saver,
        RunRecord(run_identity(cfg, scanned)),
        StopOnSignal(),
        StepProgress(every_n_steps=cfg.train.log_every_n_steps),
        Summaries(cfg),
        TrainingMetrics(),
    ]
    if held_out is not None:
        val_data = FluxDataModule.from_model_folder(
            cfg.data, folder, params.max_sequence_length, dtype, scanned=held_out
        )
        callbacks.append(ValidationLoss(cfg.validation, val_data, cfg.train.guidance))
    if previews:
        callbacks.append(
            SampleImages(
                datamodule.sample_embeddings,
                partial(_load_ae, folder, dtype),
                cfg.sample,
                out / "samples",
                weights=ema.applied if ema and cfg.ema.use_for_samples else None,
                previews=previews,
                lora_name=cfg.name,
                model=cfg.model.source,
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
        logger=make_logger(cfg.train.logger, out, cfg.name),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    return trainer, module, datamodule


def sample_previews(cfg: ExperimentConfig) -> list[SamplePrompt]:
    """The previews with the sample section's defaults filled in and ``data.trigger_word`` applied to their prompts
    as to every caption (not to keep previews: they show what the LoRA must leave alone)."""
    return [
        p
        if p.keep
        else replace(p, prompt=apply_trigger(p.prompt, cfg.data.trigger_word, f"sample prompt {p.prompt!r}"))
        for p in cfg.sample.resolved()
    ]


def _load_for_training(cfg: ExperimentConfig, folder: Path, dtype: torch.dtype, device: torch.device) -> Flux:
    return load_flow_model(
        folder,
        cfg.model.preset,
        dtype=dtype,
        device=device,
        quantize=cfg.model.quantize,
        quant_policy=cfg.model.quant_policy,
        per_channel_scale=cfg.model.fp8_scale == "row",
    )


def _load_ae(folder: Path, dtype: torch.dtype, device: torch.device):
    return load_autoencoder(folder, dtype=dtype, device=device)


def _devices(value: str) -> int | str | list[int]:
    if value == "auto":
        return "auto"
    if "," in value:
        return [int(v) for v in value.split(",") if v]
    return int(value) if value.lstrip("-").isdigit() else value


def last_checkpoint(cfg: ExperimentConfig) -> Path | None:
    """The checkpoint to resume from: the loadable one with the highest step (None with ``train.resume`` off)."""
    found = find_checkpoint(cfg.output_path / "checkpoints") if cfg.train.resume else None
    return found.path if found else None


def _first_process() -> bool:
    """True in the process that starts a run (DDP's launcher re-runs the script with LOCAL_RANK set)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def _prepare_output(cfg: ExperimentConfig, scanned: ScannedData) -> tuple[Path | None, int | None]:
    """Move the old run aside or check that it is this one; ``(checkpoint to resume, step it finished at)``."""
    if not cfg.train.resume:
        if _first_process():
            move_aside(cfg)
        return None, None
    found = find_checkpoint(cfg.output_path / "checkpoints")
    if found is None:
        return None, None
    compare(found, run_identity(cfg, scanned), cfg)
    return found.path, found.step if found.step >= cfg.train.max_steps else None


def run(cfg: ExperimentConfig) -> Path | None:
    """Train, and return the path of the final LoRA file (None when the run had already finished).

    Raises :class:`~flux_lora.training.guards.StoppedBySignal` after a clean stop on SIGTERM/SIGINT,
    :class:`~flux_lora.training.resume.RunMismatchError` when the output folder holds another run."""
    scanned = scan_all(cfg.data, exclude=[cfg.output_path])  # bad data fails here, before any model is touched
    lock = output_lock(cfg.output_path) if _first_process() else contextlib.nullcontext()
    with lock:
        if _first_process():
            clean_stale_temps(cfg.output_path)
        ckpt, finished = _prepare_output(cfg, scanned)
        if finished is not None:
            log.info("%s already finished at step %d, nothing trained", cfg.output_dir, finished)
            return None
        if _first_process():
            save_config(cfg, cfg.output_path / "config.yaml")
        trainer, module, datamodule = build(cfg, scanned)
        if ckpt:
            log.info("resuming from %s", ckpt)
        started = time.monotonic()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        if trainer.is_global_zero:
            log.info("%s", end_summary(trainer, time.monotonic() - started))
        stop = _callback(trainer, StopOnSignal)
        if stop.signum is not None and trainer.global_step < cfg.train.max_steps:
            raise StoppedBySignal(stop.signum, trainer.global_step)
    return cfg.output_path / f"{cfg.name}.safetensors"


def _callbacks(trainer: L.Trainer) -> list[L.Callback]:
    return list(getattr(trainer, "callbacks", []))


def _callback(trainer: L.Trainer, kind: type[T]) -> T:
    return next(c for c in _callbacks(trainer) if isinstance(c, kind))


def end_summary(trainer: L.Trainer, seconds: float) -> str:
    """Steps trained in this run, wall time, loss at its start and end, files written."""
    progress = _callback(trainer, StepProgress)
    written = [str(p) for p in _callback(trainer, SaveLora).written]
    written += [c.best_model_path for c in _callbacks(trainer) if isinstance(c, StepCheckpoint) and c.best_model_path]
    samples = [c for c in _callbacks(trainer) if isinstance(c, SampleImages)]
    pngs = len(samples[0].written) if samples else 0
    steps = trainer.global_step - progress.start_step
    first = f"{progress.first_loss:.4f}" if progress.first_loss is not None else "-"
    last = f"{progress.smoothed:.4f}" if progress.smoothed is not None else "-"
    files = ", ".join(written) or "none"
    return (
        f"trained {steps} steps in this run (to step {trainer.global_step}) in {seconds:.0f} s; loss {first} at the "
        f"start, {last} (smoothed) at the end; wrote {files}" + (f" and {pngs} sample images" if pngs else "")
    )
