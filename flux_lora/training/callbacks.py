"""Lightning plumbing for the trainer: atomic, weights-only checkpoints, LoRA files, and sample images."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from PIL import Image

from flux_lora.atomic import save_torch_atomic, write_atomic
from flux_lora.config import SAVE_DTYPES, SampleConfig, SamplePrompt
from flux_lora.data.cache import tensors_sha256
from flux_lora.data.scan import ScannedData
from flux_lora.dtypes import DTYPES
from flux_lora.inference.outputs import png_info
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.lora.files import write_lora
from flux_lora.lora.lycoris import kohya_tensors
from flux_lora.lora.lycoris import training_metadata as adapter_metadata
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.text_encoders import TextEmbeddings
from flux_lora.training.events import EventLog, Request, consume, pending
from flux_lora.training.guards import check_finite
from flux_lora.training.optimizers import eval_weights

if TYPE_CHECKING:
    from flux_lora.config import ExperimentConfig

log = logging.getLogger(__name__)


ADAPTERS_SHA_KEY = "flux_lora_adapters_sha256"
CONTENT_SHA_KEY = "flux_lora_content_sha256"


def checkpoint_sha256(checkpoint: dict[str, Any]) -> str:
    """sha256 of everything a checkpoint holds but this checksum: every tensor's dtype, shape and bytes and every
    other value's type and ``repr``, in a fixed walk (dict keys sorted). Bytes changed anywhere in the file
    (optimizer state, loop counters) change it, or make the file fail to load."""
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            keys = sorted((k for k in value if k != CONTENT_SHA_KEY), key=repr)
            h.update(f"D{len(keys)};".encode())
            for key in keys:
                h.update(f"K{key!r};".encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(f"{type(value).__name__}{len(value)};".encode())
            for item in value:
                walk(item)
        else:
            h.update(f"V{type(value).__name__}:{value!r};".encode())

    walk(checkpoint)
    return h.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written through a unique temporary file and a rename, with a checksum of the
    adapters (checked cheaply, memory-mapped) and one of the whole content (checked before a resume), never with
    a non-finite adapter value; read back with ``torch.load(weights_only=True)``: they only ever hold tensors and
    plain Python values."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        state = checkpoint["state_dict"]
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"refusing to write {path}: adapter weights {bad[:3]} hold non-finite values")
        checkpoint[ADAPTERS_SHA_KEY] = tensors_sha256(state)
        checkpoint[CONTENT_SHA_KEY] = checkpoint_sha256(checkpoint)
        save_torch_atomic(checkpoint, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def training_metadata(cfg: ExperimentConfig, step: int) -> dict[str, str]:
    """Training details for the kohya ``ss_*`` keys Forge and the A1111 family display."""
    t = cfg.train
    res = max(cfg.data.all_resolutions)
    triggers = dict.fromkeys(d.trigger_word for d in cfg.data.dataset_configs() if d.trigger_word)
    return {
        "ss_output_name": cfg.name,
        "ss_steps": str(step),
        "ss_learning_rate": str(t.learning_rate),
        "ss_guidance_scale": str(t.guidance),
        "ss_timestep_sampling": t.timestep_sampling,
        "ss_weighting_scheme": t.loss_weighting,
        "ss_resolution": f"({res}, {res})",
        "ss_training_finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ss_base_model": cfg.model.source,
        "flux_lora.quantize": str(cfg.model.quantize),
        "modelspec.resolution": f"{res}x{res}",
        **({"modelspec.trigger_phrase": ", ".join(triggers)} if triggers else {}),
        **adapter_metadata(cfg.lora),
    }


def dataset_metadata(scanned: ScannedData, sources: list[str]) -> dict[str, str]:
    """kohya's ``ss_tag_frequency`` (per dataset, how many captions hold each comma-separated tag: Civitai and
    the A1111 family show these as the trained words) and ``ss_num_train_images`` (samples per epoch)."""
    freq: dict[str, Counter[str]] = {}
    for r in scanned.records:
        tags = {t.strip() for t in r.caption.split(",") if t.strip()}
        freq.setdefault(sources[r.part], Counter()).update(tags)
    return {
        # by count, then by tag: the same in every process (a set's order follows the string hash seed)
        "ss_tag_frequency": json.dumps(
            {name: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for name, c in freq.items()}
        ),
        "ss_num_train_images": str(sum(r.repeats for r in scanned.records)),
    }


def _optimizer(trainer: L.Trainer) -> torch.optim.Optimizer | None:
    return trainer.optimizers[0] if trainer.optimizers else None


class StepCheckpoint(ModelCheckpoint):
    """``<dir>/step<N>.ckpt`` every ``every_n_steps`` optimizer steps (0: none on the way) and always at the
    last step of a fit, the ``keep`` newest kept; a file of the same name is replaced, never suffixed ``-v1``."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep: int = 2, events: EventLog | None = None):
        self.events = events
        super().__init__(
            dirpath=dirpath,
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps,
            every_n_epochs=0,
            save_last=False,
            monitor="step",
            mode="max",
            save_top_k=keep,
            enable_version_counter=False,
            save_on_train_epoch_end=False,
        )

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        check_finite(trainer)  # the flags of the steps since the last check, read before anything is written
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            if self.events:
                self.events.emit("checkpoint", step=trainer.global_step, path=str(Path(filepath).absolute()))
            self._prune(trainer.global_step)

    def _prune(self, step: int) -> None:
        """Keep the ``save_top_k`` newest ``step*.ckpt`` files up to ``step`` on disk, whatever this process
        remembers: earlier parts of a resumed run, or a kill between a write and a removal, leave others."""
        assert self.dirpath is not None
        steps = {int(p.stem[4:]): p for p in Path(self.dirpath).glob("step*.ckpt") if p.stem[4:].isdigit()}
        for old in sorted(s for s in steps if s <= step)[: -self.save_top_k]:
            steps[old].unlink(missing_ok=True)
            log.info("removed %s (save.keep_checkpoints %d)", steps[old], self.save_top_k)

    def _save_now(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step:
            log.info("saving the step %d checkpoint in %s", trainer.global_step, self.dirpath)
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        # the last step, or a stop requested in this one (signal): save here, while the loops' state is that of
        # a step in progress; by on_train_end Lightning has closed the epoch and a resume would start the next one
        if trainer.should_stop or trainer.global_step >= trainer.max_steps:
            self._save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_end(trainer, module)
        self._save_now(trainer)


def _due(trainer: L.Trainer, every: int, owner: Any) -> bool:
    """True once per optimizer step that is a multiple of ``every`` (not at the last step: the end hook runs)."""
    step = trainer.global_step
    if not every or step == 0 or step % every or step >= trainer.max_steps or getattr(owner, "_last", -1) == step:
        return False
    owner._last = step
    return True


class SaveLora(L.Callback):
    """Writes the adapters as a kohya-layout LoRA every ``every_n_steps`` and at the end (rank 0, atomically):
    ``<output_dir>/lora/<name>-step<N>.safetensors`` and ``<output_dir>/<name>.safetensors``."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        every_n_steps: int,
        extra_metadata: dict[str, str] | None = None,
        events: EventLog | None = None,
    ):
        self.cfg = cfg
        self.events = events
        self._last = -1  # the step of the last intermediate save (see _due)
        self.every_n_steps = every_n_steps
        self.extra_metadata = dict(extra_metadata or {})
        self.written: list[Path] = []

    def write(self, trainer: L.Trainer, module: Any, path: Path, as_trained: bool = True) -> None:
        """Write the module's adapters to ``path``: with ``as_trained`` a schedule-free optimizer's evaluation
        weights; otherwise the weights as they are (an EMA put in place). The finiteness flags of the steps since
        the last check are read first (on every rank): nothing of a step flagged non-finite, or later, is written."""
        check_finite(trainer)
        if not trainer.is_global_zero:
            return
        with eval_weights(_optimizer(trainer) if as_trained else None):
            weights = module.lora_weights()
            tensors = [t for name, w in weights.items() for t in kohya_tensors(name, w).values()]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise ValueError(f"refusing to write {path}: the adapters hold non-finite values")
            write_lora(
                path,
                weights,
                module.dit.params,
                layout="kohya",
                metadata={**training_metadata(self.cfg, trainer.global_step), **self.extra_metadata},
                dtype=DTYPES[SAVE_DTYPES[self.cfg.save.dtype]],
            )
        self.written.append(path)
        log.info("wrote %s", path)
        if self.events:
            self.events.emit("lora", step=trainer.global_step, path=str(Path(path).absolute()))

    def _prune(self) -> None:
        """Delete all but the newest ``save.keep_last`` intermediate LoRA files of this run (those of an earlier,
        resumed part of the run too)."""
        keep = self.cfg.save.keep_last
        if keep:
            for old in sorted((self.cfg.output_path / "lora").glob(f"{self.cfg.name}-step*.safetensors"))[:-keep]:
                old.unlink()
                log.info("removed %s (save.keep_last %d)", old, keep)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if _due(trainer, self.every_n_steps, self):
            step = trainer.global_step
            self.write(trainer, module, self.cfg.output_path / "lora" / f"{self.cfg.name}-step{step:06d}.safetensors")
            if trainer.is_global_zero:
                self._prune()

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        step = trainer.global_step
        if step >= trainer.max_steps:
            self.write(trainer, module, self.cfg.output_path / f"{self.cfg.name}.safetensors")
        elif step > 0 and getattr(self, "_last", -1) != step:  # stopped early: this step's LoRA, not the final
            self.write(trainer, module, self.cfg.output_path / "lora" / f"{self.cfg.name}-step{step:06d}.safetensors")


class SampleImages(L.Callback):
    """Preview images from cached prompt embeddings every ``every_n_steps`` and at the end.

    The autoencoder is loaded only to decode and released right after, so it never sits beside the training DiT."""

    def __init__(
        self,
        embeddings: Callable[[list[str]], TextEmbeddings],
        load_autoencoder: Callable[[torch.device], AutoEncoder],
        cfg: SampleConfig,
        out_dir: Path,
        weights: Callable[[Any], AbstractContextManager[Any]] | None = None,
        previews: list[SamplePrompt] | None = None,
        lora_name: str = "",
        model: str = "",
        events: EventLog | None = None,
    ):
        self.events = events
        self._last = -1  # the step of the last periodic or requested previews (see _due)
        self.weights = weights  # puts other weights in place (an EMA) while sampling
        self.previews = cfg.resolved() if previews is None else list(previews)
        self.lora_name, self.model = lora_name, model
        self.embeddings = embeddings
        self.load_autoencoder = load_autoencoder
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.written: list[Path] = []

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, module: Any) -> None:
        check_finite(trainer)
        if not trainer.is_global_zero or not self.previews:
            return
        device = module.device
        was_training = module.dit.training
        module.dit.eval()
        ae = self.load_autoencoder(device)
        images: list[Image.Image] = []
        try:
            weights = self.weights(module) if self.weights else eval_weights(_optimizer(trainer))
            with weights:
                pipe = FluxPipeline(module.dit, ae, None, device=device)
                for p in self.previews:  # each with its own seed, size, steps, guidance and negative prompt
                    emb = self.embeddings([p.prompt, p.negative_prompt])
                    images += pipe(
                        text_embeddings=emb[0:1],
                        reference_image=None if p.reference is None else open_reference(p.reference),
                        reference_size=p.reference_size,
                        negative_text_embeddings=emb[1:2] if p.true_cfg != 1.0 else None,
                        true_cfg=p.true_cfg,
                        height=p.height or self.cfg.height,
                        width=p.width or self.cfg.width,
                        num_inference_steps=p.steps,
                        guidance=p.guidance,
                        seed=p.seed,
                        progress=False,
                    )
        finally:
            del ae
            module.dit.train(was_training)
        step = trainer.global_step
        experiment: Any = getattr(trainer.logger, "experiment", None)
        for i, (image, p) in enumerate(zip(images, self.previews, strict=True)):
            path = self.out_dir / f"step{step:06d}-{i}.png"
            settings = self._settings(p, step, module)
            write_atomic(path, partial(image.save, format="PNG", pnginfo=png_info(settings)))
            self.written.append(path)
            if self.events:
                self.events.emit("sample", step=step, path=str(path.absolute()), prompt=p.prompt, seed=p.seed)
            if hasattr(experiment, "add_image"):
                tag = f"samples/{i}: {p.prompt[:60]}"  # named after the prompt, kept apart by index
                experiment.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def _settings(self, p: SamplePrompt, step: int, module: Any) -> dict[str, Any]:
        """What the PNG records: the preview's settings (a reference as generate.py records it), the training
        step and the LoRA."""
        settings = dataclasses.asdict(p)
        reference, size = settings.pop("reference"), settings.pop("reference_size")
        return {
            **settings,
            **({"reference_image": reference, "reference_size": size} if reference is not None else {}),
            "steps": p.steps or module.dit.params.default_steps,
            "step": step,
            "lora": self.lora_name,
            "model": self.model,
        }

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if self.cfg.at_start and trainer.global_step == 0:
            self.sample(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if _due(trainer, self.cfg.every_n_steps, self):
            self.sample(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self.sample(trainer, module)


def open_reference(path: str) -> Image.Image:
    """A preview's reference image (FLUX.1 Kontext), read whole, in RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ControlRequests(L.Callback):
    """Acts on ``<output_dir>/control/save-now`` and ``sample-now`` (:func:`flux_lora.training.events.request`)
    after each optimizer step: rank 0 looks for the files, every rank takes the decision together (as the signal
    stop does), the file is deleted and the LoRA and checkpoint written, or the previews drawn, at this step.
    Neither touches the training's random state, so the run's final LoRA is the same with or without them.
    Place it after the savers and the sampler: a periodic save or sample due at the same step is not repeated."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self._step_at_start = 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def _asked(self, trainer: L.Trainer, what: Request) -> bool:
        seen = trainer.is_global_zero and pending(self.output_dir, what)
        if not trainer.strategy.reduce_boolean_decision(seen, all=False):
            return False
        if trainer.is_global_zero:
            consume(self.output_dir, what)
        return True

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._step_at_start:  # mid gradient accumulation: act after the optimizer step
            return
        seen = trainer.is_global_zero and any(pending(self.output_dir, what) for what in ("save-now", "sample-now"))
        if not trainer.strategy.reduce_boolean_decision(seen, all=False):  # one collective per step, as StopOnSignal
            return
        last = step >= trainer.max_steps  # the end of the fit writes and samples this step anyway
        callbacks = list(getattr(trainer, "callbacks", []))
        if self._asked(trainer, "save-now"):
            if trainer.is_global_zero:
                log.info("save-now requested: saving step %d%s", step, " (the run's end does)" if last else "")
            if not last:
                for saver in (c for c in callbacks if isinstance(c, SaveLora)):
                    if saver._last != step:
                        saver._last = step
                        name = f"{saver.cfg.name}-step{step:06d}.safetensors"
                        saver.write(trainer, module, saver.cfg.output_path / "lora" / name)
                for ckpt in (c for c in callbacks if isinstance(c, StepCheckpoint)):
                    ckpt._save_now(trainer)
        if self._asked(trainer, "sample-now"):
            samplers = [c for c in callbacks if isinstance(c, SampleImages) and c.previews]
            if trainer.is_global_zero:
                what = "no sample.prompts to draw" if not samplers else f"drawing the previews at step {step}"
                log.info("sample-now requested: %s", what)
            if not last:
                for sampler in samplers:
                    if sampler._last != step:
                        sampler._last = step
                        sampler.sample(trainer, module)


class RunEvents(L.Callback):
    """The ``start`` event of :mod:`flux_lora.training.events` (rank 0); :func:`flux_lora.training.run.run`
    writes the ``end`` one."""

    def __init__(self, events: EventLog, name: str) -> None:
        self.events, self.name = events, name

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            resumed = trainer.ckpt_path
            self.events.emit(
                "start",
                step=trainer.global_step,
                max_steps=trainer.max_steps,
                name=self.name,
                resumed_from=str(Path(resumed).absolute()) if resumed else None,
                pid=os.getpid(),
            )
