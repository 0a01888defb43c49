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
from lightning.fabric.plugins.environments import SLURMEnvironment
from PIL import Image
from safetensors import safe_open

from flux_lora import config_io
from flux_lora.atomic import temp_path
from flux_lora.config import DataError, ExperimentConfig, SamplePrompt, save_config
from flux_lora.config_io import ConfigError
from flux_lora.data.datamodule import FluxDataModule
from flux_lora.data.scan import ScannedData, apply_trigger, scan_all
from flux_lora.data.stream import any_streaming, fill_streams
from flux_lora.dtypes import DTYPES
from flux_lora.lora.files import read_lora
from flux_lora.lora.peft_adapters import check_targets
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.flux import Flux
from flux_lora.training.callbacks import (
    AtomicCheckpointIO,
    ControlRequests,
    RunEvents,
    SampleImages,
    SaveLora,
    StepCheckpoint,
    dataset_metadata,
)
from flux_lora.training.console import StepProgress, Summaries
from flux_lora.training.ema import AdapterEma
from flux_lora.training.events import EventLog, events_path, one_line
from flux_lora.training.guards import FiniteGuard, StopOnSignal, StoppedBySignal
from flux_lora.training.metrics import TrainingMetrics, make_logger
from flux_lora.training.module import FluxLoraModule
from flux_lora.training.regularization import generated_entries, prepare_regularization
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
        # processes Lightning starts after the first fetched (torchrun's and srun's start together: each fetches,
        # the hub library's file locks keep them apart)
        local_files_only=launch_ranks()[1] > 0 and "RANK" not in os.environ and not SLURMEnvironment.detect(),
    )


def stream_sources(cfg: ExperimentConfig) -> None:
    """Encode the streaming datasets (data.streaming) into the cache as they are read, so that the scan finds
    their records; nothing when there are none or they were read before (:mod:`flux_lora.data.stream`)."""
    if not any_streaming(cfg.data):
        return
    folder = fetch_model_folder(cfg)
    params = flux_params(cfg.model.preset or folder)
    accelerator = resolve_accelerator(cfg)
    cuda = accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    dm = FluxDataModule.from_model_folder(
        cfg.data, folder, params.max_sequence_length, compute_dtype(cfg, accelerator), device=device
    )
    rank, ranks = stream_ranks()
    fill_streams(cfg.data, dm.text_spec, dm.ae_spec, dm.load_text_encoders, dm.load_autoencoder, device, rank, ranks)


def stream_ranks() -> tuple[int, int]:
    """``(rank, ranks)`` among the processes of this node that read a stream together before training starts:
    those torchrun started (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``); ``(0, 1)`` otherwise (Lightning's own
    launcher starts the others only once training begins; under srun each process reads the whole stream)."""
    env = os.environ
    if "RANK" in env and "LOCAL_WORLD_SIZE" in env:
        return int(env.get("LOCAL_RANK", "0")), int(env["LOCAL_WORLD_SIZE"])
    return 0, 1


def build(
    cfg: ExperimentConfig, scanned: ScannedData | None = None
) -> tuple[L.Trainer, FluxLoraModule, FluxDataModule]:
    """Everything ``trainer.fit`` needs, nothing loaded yet but the data scan (``scanned``, or done here) and,
    for ``data.datasets`` entries that generate regularization images, the base model once to draw the missing
    ones (see :mod:`flux_lora.training.regularization`)."""
    cfg = with_regularization(cfg)
    if scanned is None:
        stream_sources(cfg)
    scanned = scanned or scan_all(cfg.data, exclude=[cfg.output_path])  # bad data fails here, before any model
    previews = sample_previews(cfg)
    check_preview_references(cfg)  # before any model is fetched
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
    if any(p.reference for p in previews) and not params.guidance_embed:
        raise ConfigError(
            f"sample: a preview with a reference needs a FLUX.1 Kontext model; {cfg.model.source} is schnell-type"
        )
    if any(p.reference for p in previews) and not params.kontext:
        log.warning(
            "%s is not a FLUX.1 Kontext model: the previews' references are appended all the same", cfg.model.source
        )
    try:
        check_targets(cfg.lora, params)  # block indices, targets and rank patterns, before any model loads
    except ValueError as e:
        raise ConfigError(str(e)) from None
    accelerator = resolve_accelerator(cfg)
    dtype = compute_dtype(cfg, accelerator)
    cuda = accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    speed = plan_speed(cfg.model, torch.cuda.get_device_capability(0) if cuda else None)
    out = cfg.output_path

    scanned, held_out = held_out_data(cfg, scanned)
    datamodule = FluxDataModule.from_model_folder(
        cfg.data, folder, params.max_sequence_length, dtype, sample_prompts=prompts, scanned=scanned
    )
    datamodule.references()  # Kontext pairs: a missing or unreadable reference fails here, before any model
    plain = cfg.lora.kind == "lora"  # the other kinds are read as the patches they are, and loaded as such
    if cfg.train.init_lora:  # read once now, so a bad file stops the run before the cache fill and the model load
        try:
            read_lora(cfg.train.init_lora, params, plain=plain)
        except ValueError as e:
            raise DataError(f"train.init_lora: {' '.join(str(e).split())}") from None
    initial = partial(read_lora, cfg.train.init_lora, plain=plain) if cfg.train.init_lora else None
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
    events = EventLog(events_path(out))
    saver = SaveLora(cfg, cfg.train.save_every_n_steps, metadata, events=events)
    ema = AdapterEma(cfg.ema, saver) if cfg.ema.enabled else None
    callbacks: list[L.Callback] = [
        FiniteGuard(cfg.train.log_every_n_steps),  # first: its interval check precedes the step's saves
        *([ema] if ema else []),  # first: a step's samples and checkpoint see its EMA update
        # the two newest step checkpoints, the last step always among them (adapters and optimizer state)
        StepCheckpoint(out / "checkpoints", cfg.train.checkpoint_every_n_steps, cfg.save.keep_checkpoints, events),
        saver,
        RunEvents(events, cfg.name),
        RunRecord(run_identity(cfg, scanned)),
        StopOnSignal(),
        StepProgress(every_n_steps=cfg.train.log_every_n_steps, events=events),
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
                events=events,
            )
        )
    callbacks.append(ControlRequests(out))  # last: after the periodic saves and samples of the same step
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
        logger=make_logger(cfg.train.logger, out, cfg.name, config_io.to_dict(cfg)),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    return trainer, module, datamodule


def with_regularization(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its generated regularization entries as folders (drawn first where missing, on the run's
    model, dtype and device; the pipeline is released before anything else loads)."""
    if not generated_entries(cfg):
        return cfg
    accelerator = resolve_accelerator(cfg)
    cuda = accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    return prepare_regularization(
        cfg, fetch_model_folder(cfg), compute_dtype(cfg, accelerator), "cuda" if cuda else "cpu"
    )


def _own_data(cfg: ExperimentConfig) -> ExperimentConfig | None:
    """``cfg`` with only the datasets read from sources (None if every entry generates its images)."""
    own = [d for d in cfg.data.datasets if d.generate is None]
    return replace(cfg, data=replace(cfg.data, datasets=own)) if own else None


def sample_previews(cfg: ExperimentConfig) -> list[SamplePrompt]:
    """The previews with the sample section's defaults filled in and ``data.trigger_word`` applied to their prompts
    as to every caption (not to keep previews: they show what the LoRA must leave alone)."""
    return [
        p
        if p.keep
        else replace(p, prompt=apply_trigger(p.prompt, cfg.data.trigger_word, f"sample prompt {p.prompt!r}"))
        for p in cfg.sample.resolved()
    ]


def check_preview_references(cfg: ExperimentConfig) -> None:
    """Every preview's reference image (FLUX.1 Kontext) exists and reads as an image: else one line naming its key."""
    for section in ("prompts", "keep_prompts"):
        for i, item in enumerate(getattr(cfg.sample, section)):
            path = None if isinstance(item, str) else item.reference
            if path is None:
                continue
            key = f"sample.{section}[{i}].reference: {path}"
            if not Path(path).is_file():
                raise DataError(f"{key}: no such file")
            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, SyntaxError) as e:
                raise DataError(f"{key}: not a readable image ({' '.join(str(e).split())})") from None


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


def _load_ae(folder: Path, dtype: torch.dtype, device: torch.device) -> AutoEncoder:
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


def check_writable(folder: Path) -> None:
    """Create ``folder`` and a file in it (removed again), or raise :class:`ConfigError` naming it: a read-only
    ``output_dir`` stops the run before anything is scanned or loaded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / ".write-test")  # unique per process and call
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {folder} cannot be written ({e.strerror or e})") from None


def launch_ranks() -> tuple[int, int]:
    """``(global rank, local rank)`` of this process as its launcher set them, before any process group exists:
    torchrun (``RANK``, ``LOCAL_RANK``), Slurm's srun (``SLURM_PROCID``, ``SLURM_LOCALID``, as Lightning's
    ``SLURMEnvironment`` detects it) or Lightning's own launcher, which starts a node's other processes with
    ``LOCAL_RANK`` set and is itself started with ``NODE_RANK`` (a global rank of 1 stands for any other)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    if SLURMEnvironment.detect():
        return int(env.get("SLURM_PROCID", "0")), int(env.get("SLURM_LOCALID", "0"))
    local = int(env.get("LOCAL_RANK", "0"))
    return (0 if local == 0 and int(env.get("NODE_RANK", "0")) == 0 else 1), local


def _first_process() -> bool:
    """True in the one process of a run that moves old outputs aside and holds the output lock."""
    return launch_ranks()[0] == 0


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
    """Train, and return the path of the final LoRA file (None when the run had already finished and its final
    LoRA files are there -- when they are not, they are written from the final checkpoint -- and in DDP processes
    other than rank 0, which writes it).

    Raises :class:`~flux_lora.training.guards.StoppedBySignal` after a clean stop on SIGTERM/SIGINT,
    :class:`~flux_lora.training.resume.RunMismatchError` when the output folder holds another run."""
    check_writable(cfg.output_path)
    exclude = [cfg.output_path]
    original, generates = cfg, bool(generated_entries(cfg))
    own = _own_data(cfg) if generates else cfg
    stream_sources(cfg)  # streaming datasets are read into the cache first (model files needed, no DiT)
    scanned = scan_all(own.data, exclude=exclude) if own else None  # bad data fails here, before any model
    lock = output_lock(cfg.output_path) if _first_process() else contextlib.nullcontext()
    with lock:
        if _first_process():
            clean_stale_temps(cfg.output_path)
        if generates or scanned is None:
            cfg = with_regularization(cfg)  # a rerun finds them made and loads nothing
            scanned = scan_all(cfg.data, exclude=exclude)
        ckpt, finished = _prepare_output(cfg, scanned)
        if finished is not None:
            missing = [p for p in final_loras(cfg) if lora_step(p) != finished]
            if not missing:
                log.info("%s already finished at step %d, nothing trained", cfg.output_dir, finished)
                return None
            assert ckpt is not None
            return _write_missing_finals(cfg, scanned, ckpt, finished, missing)
        if _first_process():
            keep_previous_finals(cfg)  # training on: the finished part's LoRA must not be overwritten
            save_config(original, cfg.output_path / "config.yaml")  # with the class prompts, not their folder
        trainer, module, datamodule = build(cfg, scanned)
        if ckpt:
            log.info("resuming from %s", ckpt)
        started = time.monotonic()
        events = EventLog(events_path(cfg.output_path))
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        except BaseException as e:  # the end event, then the error goes on as before
            if trainer.is_global_zero:
                stopped = isinstance(e, (StoppedBySignal, KeyboardInterrupt, SystemExit))
                events.emit(
                    "end", step=trainer.global_step, status="stopped" if stopped else "failed", message=one_line(e)
                )
            raise
        summary = end_summary(trainer, time.monotonic() - started) if trainer.is_global_zero else ""
        stop = _callback(trainer, StopOnSignal)
        if summary:
            log.info("%s", summary)
        if stop.signum is not None and trainer.global_step < cfg.train.max_steps:
            stopped_by = StoppedBySignal(stop.signum, trainer.global_step)
            if trainer.is_global_zero:
                events.emit("end", step=trainer.global_step, status="stopped", message=str(stopped_by))
            raise stopped_by
        if trainer.is_global_zero:
            events.emit("end", step=trainer.global_step, status="finished", message=summary)
        if not trainer.is_global_zero:
            return None  # rank 0 writes the LoRA, and says so once it is written
    return cfg.output_path / f"{cfg.name}.safetensors"


def final_loras(cfg: ExperimentConfig) -> list[Path]:
    """The LoRA files a finished run leaves: ``<name>.safetensors`` and, with an EMA, ``<name>_ema.safetensors``."""
    out = cfg.output_path
    return [out / f"{cfg.name}.safetensors"] + ([out / f"{cfg.name}_ema.safetensors"] if cfg.ema.enabled else [])


def lora_step(path: Path) -> int | None:
    """The training step a LoRA file of ours records (``ss_steps``); None when absent or unreadable."""
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("ss_steps", ""))
    except Exception:  # missing, damaged, or not ours
        return None


def keep_previous_finals(cfg: ExperimentConfig, keep_step: int | None = None) -> list[Path]:
    """Move the final LoRA files of an earlier part of the run (a finished run trained on with more steps) to
    ``lora/<stem>-step<N>.safetensors``, so the new final does not overwrite them; ``keep_step``: leave a file of
    that step in place."""
    kept = []
    for path in final_loras(cfg):
        step = lora_step(path)
        if not path.exists() or (keep_step is not None and step == keep_step):
            continue
        base = f"{path.stem}-step{step:06d}" if step is not None else f"{path.stem}-previous"
        target, n = path.parent / "lora" / f"{base}.safetensors", 1
        while target.exists():  # never over another file
            n += 1
            target = path.parent / "lora" / f"{base}-{n}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log.info("kept the previous final LoRA %s (step %s) as %s", path.name, step, target)
        kept.append(target)
    return kept


def _write_missing_finals(
    cfg: ExperimentConfig, scanned: ScannedData, ckpt: Path, step: int, missing: list[Path]
) -> Path:
    """A finished run whose final LoRA files were not written (killed between the final checkpoint and them):
    restore the final checkpoint (Lightning trains nothing at max_steps) and write them as the run's end would."""
    names = ", ".join(p.name for p in missing)
    log.warning("%s finished at step %d but %s missing: writing from %s", cfg.output_dir, step, names, ckpt)
    if _first_process():
        keep_previous_finals(cfg, keep_step=step)
    trainer, module, datamodule = build(cfg, scanned)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    # the checkpoint was written after its finiteness check: nothing to read (no collective after the fit)
    _callback(trainer, FiniteGuard)._checked_at = trainer.global_step
    saver = _callback(trainer, SaveLora)
    writers: list[SaveLora | AdapterEma] = [saver, *(c for c in _callbacks(trainer) if isinstance(c, AdapterEma))]
    for writer, path in zip(writers, final_loras(cfg), strict=True):
        if path in missing:
            writer.on_train_end(trainer, module)
    if trainer.is_global_zero:
        files = ", ".join(str(p) for p in saver.written)
        log.info("trained nothing (finished at step %d); wrote the missing final LoRA files: %s", step, files)
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
