"""Which state a run continues from, and whether it may: run identity, checkpoint choice, the output lock.

A checkpoint records what defines its run (:func:`run_identity`: the data's content and batching, the model,
the LoRA, optimizer and schedule, and the objective). Before any model loads, a rerun compares its own identity
with the newest loadable checkpoint's and refuses on a difference, naming the keys. Settings that only say how
long or how often (``max_steps``, sampling, save and log intervals, devices) may change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from flux_lora.config import ExperimentConfig
from flux_lora.config_io import ConfigError
from flux_lora.data.cache import tensors_sha256
from flux_lora.data.scan import ScannedData
from flux_lora.training.callbacks import ADAPTERS_SHA_KEY, CONTENT_SHA_KEY, checkpoint_sha256

log = logging.getLogger(__name__)

IDENTITY_KEY = "flux_lora_run"
DATA_FIELDS = (
    "resolution",
    "datasets",
    "bucket_step",
    "max_aspect",
    "upscale",
    "crop",
    "crop_variants",
    "flip",
    "repeats",
    "batch_size",
    "drop_last",
    "shuffle",
    "seed",
)
MODEL_FIELDS = ("source", "hub", "revision", "preset", "quantize", "quant_policy", "dtype")
TRAIN_FIELDS = (
    "seed",
    "learning_rate",
    "optimizer",
    "optimizer_args",
    "lr_scheduler",
    "warmup_steps",
    "min_lr_ratio",
    "gradient_clip",
    "accumulate_grad_batches",
    "timestep_sampling",
    "logit_mean",
    "logit_std",
    "sigmoid_scale",
    "shift",
    "fixed_shift",
    "guidance",
    "caption_dropout",
    "loss_weighting",
    "precision",
    "init_lora",
)
# What a run leaves in its output folder (moved aside as a whole by ``--train.resume false``).
RUN_OUTPUTS = ("checkpoints", "lora", "samples", "logs", "config.yaml", "events.jsonl")


class RunMismatchError(ConfigError):
    """The output folder holds a run with other settings; the message names them and the two ways on."""


class OutputInUseError(ConfigError):
    """Another process holds the output folder's lock; the message names it."""


def data_fingerprint(scanned: ScannedData) -> str:
    """Content of the training set: every image's hash, size and caption, in scan order (not the paths: the
    same data in a moved folder is the same run)."""
    rows: list[object] = [(r.caption, r.image_hash, r.width, r.height, r.repeats, r.part) for r in scanned.records]
    if any(r.loss_weight != 1.0 for r in scanned.records):  # runs without loss weights keep their identity
        rows.append([r.loss_weight for r in scanned.records])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def run_identity(cfg: ExperimentConfig, scanned: ScannedData) -> dict[str, str]:
    """Dotted key -> value (as text) of everything that defines what a run trains."""
    identity = {"data.images": data_fingerprint(scanned)}
    identity |= {f"data.{k}": str(getattr(cfg.data, k)) for k in DATA_FIELDS}
    identity |= {f"model.{k}": str(getattr(cfg.model, k)) for k in MODEL_FIELDS}
    identity |= {f"lora.{k}": str(v) for k, v in asdict(cfg.lora).items()}
    identity |= {f"train.{k}": str(getattr(cfg.train, k)) for k in TRAIN_FIELDS}
    if cfg.preservation.enabled:  # only when on: runs from before the section keep their identity
        identity |= {f"preservation.{k}": str(v) for k, v in asdict(cfg.preservation).items()}
    return identity


def settle_loop_state(checkpoint: dict[str, Any]) -> None:
    """Put a checkpoint's fit-loop counters in the form of a straight run's checkpoint saved at a batch's end.

    Lightning (2.6) resumed at an epoch's end starts the next epoch without counting it as ready and started,
    so a checkpoint saved at the end of that next epoch reads as a finished epoch with none in progress, and a
    run resumed from it replays that epoch's data. A checkpoint saved in ``on_train_end`` (a stop that a later
    callback requested) has the batch and the epoch closed, and resumed at an epoch's end it also loses its
    place. The data loader's state (:class:`~flux_lora.data.datamodule.ResumableDataLoader`) holds the epoch
    the last batch came from, ``e``: at that batch's end a straight run has counted epochs ready = started =
    ``e + 1`` and processed = completed = ``e``, and the batch not yet completed. Applied when checkpoints are
    saved and again when they are loaded (files written before this fix)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit_loop, dict) or "epoch_progress" not in fit_loop:
        return
    batches = fit_loop.get("epoch_loop.batch_progress", {})
    total, current = batches.get("total", {}), batches.get("current", {})
    loaders = fit_loop.get("state_dict", {}).get("combined_loader") or []
    if not total or len(loaders) != 1 or not isinstance(loaders[0], dict) or "epoch" not in loaders[0]:
        return
    if total.get("started") != total.get("processed") or total.get("processed", 0) < 1:
        return  # not saved after a batch
    if total.get("completed") == total["processed"]:  # saved in on_train_end: reopen the last batch
        total["completed"] -= 1
        current["completed"] = max(current.get("completed", 1) - 1, 0)
        stepped = fit_loop.get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in stepped:
            stepped["_batches_that_stepped"] -= 1
    elif total.get("completed") != total["processed"] - 1:
        return
    epoch = int(loaders[0]["epoch"])
    for part in ("total", "current"):
        fit_loop["epoch_progress"][part].update(ready=epoch + 1, started=epoch + 1, processed=epoch, completed=epoch)


@dataclass(frozen=True)
class FoundCheckpoint:
    path: Path
    step: int
    identity: dict[str, str] | None


def _inspect(path: Path) -> FoundCheckpoint:
    """Read a checkpoint's step and identity (memory-mapped: cheap) and verify its adapters' checksum."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    expected = ckpt.get(ADAPTERS_SHA_KEY)
    if expected is not None and tensors_sha256(ckpt["state_dict"]) != expected:
        raise ValueError("its adapter weights fail their checksum")
    return FoundCheckpoint(path, int(ckpt["global_step"]), ckpt.get(IDENTITY_KEY))


def _load_fully(path: Path) -> None:
    """Read the whole checkpoint as a resume will and verify its content checksum: damage in the optimizer state
    or the loop counters, which the adapters' checksum does not cover, fails here and not after the model
    loaded (checkpoints written before content checksums only have to load)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    expected = ckpt.get(CONTENT_SHA_KEY)
    if expected is not None and checkpoint_sha256(ckpt) != expected:
        raise ValueError("its content fails its checksum")


def _skip(path: Path, error: Exception) -> None:
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]  # one line
    log.warning("skipping checkpoint %s: unreadable (%s)", path, reason)


def find_checkpoint(folder: Path) -> FoundCheckpoint | None:
    """The checkpoint with the highest step among those in ``folder`` that load completely; damaged ones are
    skipped with a one-line warning naming them."""
    found: list[FoundCheckpoint] = []
    for path in sorted(Path(folder).glob("*.ckpt")):
        try:
            found.append(_inspect(path))
        except Exception as e:  # truncated (PytorchStreamReader), empty (EOFError), checksum, ...
            _skip(path, e)
    for candidate in sorted(found, key=lambda f: (f.step, f.path.name != "last.ckpt"), reverse=True):
        try:
            _load_fully(candidate.path)
        except Exception as e:  # a record whose bytes changed (CRC), ...
            _skip(candidate.path, e)
            continue
        return candidate
    return None


def compare(found: FoundCheckpoint, identity: dict[str, str], cfg: ExperimentConfig) -> None:
    """Raise :class:`RunMismatchError` when ``found`` was trained with other settings than ``identity``."""
    if found.identity is None:
        log.warning("%s predates run records: its settings cannot be compared with this run's", found.path)
        return
    keys = sorted(k for k in identity.keys() | found.identity.keys() if identity.get(k) != found.identity.get(k))
    if not keys:
        return
    changes = ", ".join(
        k if k == "data.images" else f"{k} ({found.identity.get(k)} -> {identity.get(k)})" for k in keys
    )
    raise RunMismatchError(
        f"{cfg.output_dir} holds a run (step {found.step}) with other settings: {changes}. Use a new "
        f"--output_dir, or --train.resume false to move that run aside into {cfg.output_dir}/previous-<time>/ "
        "and start over"
    )


def move_aside(cfg: ExperimentConfig) -> Path | None:
    """Move the previous run's outputs (checkpoints, LoRAs, samples, logs, config) into a dated subfolder."""
    out = cfg.output_path
    items = [out / n for n in RUN_OUTPUTS] + sorted(out.glob("*.safetensors"))
    items = [p for p in items if p.exists()]
    if not items:
        return None
    target = out / time.strftime("previous-%Y%m%d-%H%M%S")
    n = 1
    while target.exists():
        n += 1
        target = out / time.strftime(f"previous-%Y%m%d-%H%M%S-{n}")
    target.mkdir(parents=True)
    for p in items:
        shutil.move(str(p), str(target / p.name))
    log.info("train.resume is false: moved the previous run's outputs into %s", target)
    return target


def clean_stale_temps(out: Path) -> int:
    """Remove temporary files that killed writes left under ``out`` (call with the output lock held)."""
    stale = [p for p in out.rglob(".*.tmp") if p.is_file() and "previous-" not in str(p.relative_to(out))]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary files left by an interrupted run in %s", len(stale), out)
    return len(stale)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the run (``flock``: released when the process dies, even by ``kill -9``)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(out / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputInUseError(
                f"output_dir {out} is in use by {holder}: wait for it to finish or choose another --output_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RunRecord(L.Callback):
    """Stores the run identity in every checkpoint (the adapters' checksum is added when it is written:
    ``AtomicCheckpointIO``)."""

    def __init__(self, identity: dict[str, str]):
        self.identity = identity

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[IDENTITY_KEY] = dict(self.identity)
