"""Regularization images made by the base model: generated once, before training, then plain training data.

A ``data.datasets`` entry with ``generate`` (:class:`~flux_lora.config.RegularizationImages`) names class prompts
instead of a folder. :func:`prepare_regularization` gives each such entry a folder under
``<data.cache_dir>/regularization/<key>/``, where ``key`` is a sha256 of the model's fingerprint (its files,
sampled as the encoder cache does), the compute dtype and quantization, the sampler settings (size, steps,
guidance) and every (prompt, seed). Missing images are drawn with the project's :class:`FluxPipeline` on the run's
model source and device; each is written atomically as ``regNNNNN_<hash>.png`` (its prompt and settings in the PNG's
text chunks) after its ``.txt`` caption, so an interrupted pass resumes where it stopped. The pipeline is released
before training loads the DiT. A folder that is complete loads nothing: a rerun costs one fingerprint.

The entry then becomes a user folder marked ``regularization`` (no trigger word, its own ``loss_weight`` and
``repeats``) and flows through the normal scan -> cache -> data module path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flux_lora.atomic import write_text_atomic
from flux_lora.config import DataConfig, DatasetConfig, ExperimentConfig, RegularizationImages
from flux_lora.data.cache import release
from flux_lora.data.fingerprint import fingerprint_paths
from flux_lora.inference.outputs import save_png
from flux_lora.inference.pipeline import FluxPipeline

log = logging.getLogger(__name__)

FOLDER = "regularization"
MANIFEST = "regularization.json"
KEY_VERSION = 1


@dataclass(frozen=True)
class RegImage:
    """One image of a set: its prompt, seed and file stem."""

    prompt: str
    seed: int
    stem: str


@dataclass(frozen=True)
class Sampler:
    """What decides the pixels besides prompt and seed: model identity, numerics and sampler settings."""

    model: str  # fingerprint of the model folder's files
    dtype: str
    quantize: str | None
    quant_policy: str
    size: int
    steps: int | None
    guidance: float


def images_of(gen: RegularizationImages) -> list[RegImage]:
    """Every image of the set, prompt by prompt: image ``k`` uses seed ``gen.seed + k``."""
    out = []
    for i, prompt in enumerate(gen.prompts):
        for j in range(gen.images_per_prompt):
            k = i * gen.images_per_prompt + j
            digest = hashlib.sha256(json.dumps([prompt, gen.seed + k]).encode()).hexdigest()[:10]
            out.append(RegImage(prompt, gen.seed + k, f"reg{k:05d}_{digest}"))  # not N_name: no kohya folder
    return out


def set_key(sampler: Sampler, images: list[RegImage]) -> str:
    """The folder's key: changes with the model, numerics, sampler settings, any prompt or seed."""
    payload = {
        "v": KEY_VERSION,
        "sampler": sampler.__dict__,
        "images": [(im.prompt, im.seed) for im in images],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def entry_size(data: DataConfig, entry: DatasetConfig, gen: RegularizationImages) -> int:
    """``gen.size``, else the largest resolution of the entry (its own or the data section's)."""
    if gen.size is not None:
        return gen.size
    res = entry.resolution if entry.resolution is not None else data.resolution
    return max(res) if isinstance(res, list) else res


def set_folder(cache_dir: str | Path, sampler: Sampler, images: list[RegImage]) -> Path:
    return Path(cache_dir) / FOLDER / set_key(sampler, images)


def missing(folder: Path, images: list[RegImage]) -> list[RegImage]:
    """The images of the set without their PNG in ``folder`` (each PNG is written whole, after its caption)."""
    return [im for im in images if not (folder / f"{im.stem}.png").is_file()]


def generated_entries(cfg: ExperimentConfig) -> list[int]:
    return [i for i, d in enumerate(cfg.data.datasets) if d.generate is not None]


def prepare_regularization(
    cfg: ExperimentConfig, model_folder: Path, dtype: torch.dtype, device: str | torch.device
) -> ExperimentConfig:
    """``cfg`` with every ``generate`` entry of ``data.datasets`` replaced by its folder of generated images
    (marked ``regularization``), drawing the missing ones first. ``cfg`` itself is returned when no entry
    generates; nothing is loaded when every folder is complete."""
    todo = generated_entries(cfg)
    if not todo:
        return cfg
    model_id = fingerprint_paths([model_folder])
    entries = list(cfg.data.datasets)
    work: list[tuple[Path, RegularizationImages, Sampler, list[RegImage], list[RegImage]]] = []
    for i in todo:
        entry = entries[i]
        gen = entry.generate
        assert gen is not None
        sampler = Sampler(
            model_id,
            str(dtype).removeprefix("torch."),
            cfg.model.quantize,
            cfg.model.quant_policy,
            entry_size(cfg.data, entry, gen),
            gen.steps,
            gen.guidance,
        )
        images = images_of(gen)
        folder = set_folder(cfg.data.cache_path, sampler, images)
        todo_images = missing(folder, images)
        log.info(
            "data.datasets[%d]: %d regularization images in %s, %d to generate",
            i,
            len(images),
            folder,
            len(todo_images),
        )
        if todo_images:
            work.append((folder, gen, sampler, images, todo_images))
        entries[i] = replace(entry, source=str(folder), generate=None, regularization=True)
    if work:
        _generate(work, cfg, model_folder, dtype, torch.device(device))
    return replace(cfg, data=replace(cfg.data, datasets=entries))


def _generate(
    work: list[tuple[Path, RegularizationImages, Sampler, list[RegImage], list[RegImage]]],
    cfg: ExperimentConfig,
    model_folder: Path,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Draw every missing image with one pipeline, then release it."""
    started, count = time.monotonic(), 0
    pipe = FluxPipeline.from_pretrained(
        model_folder,
        quantize=cfg.model.quantize,
        quant_policy=cfg.model.quant_policy,
        dtype=dtype,
        device=device,
        offload="model" if device.type == "cuda" else None,  # one of T5 and the DiT on the GPU at a time
    )
    try:
        for folder, gen, sampler, images, todo in work:
            folder.mkdir(parents=True, exist_ok=True)
            _write_manifest(folder, gen, sampler, images)
            for start in range(0, len(todo), gen.batch_size):
                batch = todo[start : start + gen.batch_size]
                _draw(pipe, folder, sampler, batch, str(cfg.model.source))
                count += len(batch)
    finally:
        for module in (pipe.dit, pipe.ae, pipe.text_encoders):
            release(module)
        del pipe
    log.info("generated %d regularization images in %.0f s; sampler released", count, time.monotonic() - started)


def _draw(pipe: FluxPipeline, folder: Path, sampler: Sampler, batch: list[RegImage], model: str) -> None:
    """One DiT batch; each image's noise from its own seed, so an image does not depend on its batch."""
    lh = lw = sampler.size // pipe.ae.params.downscale_factor
    noise = torch.cat([pipe.noise(1, lh, lw, torch.Generator().manual_seed(im.seed)) for im in batch])
    pictures = pipe(
        [im.prompt for im in batch],
        height=sampler.size,
        width=sampler.size,
        num_inference_steps=sampler.steps,
        guidance=sampler.guidance if pipe.dit.params.guidance_embed else None,
        latents=noise,
        progress=False,
    )
    steps = sampler.steps or pipe.dit.params.default_steps
    assert isinstance(pictures, list)
    for im, picture in zip(batch, pictures, strict=True):
        write_text_atomic(folder / f"{im.stem}.txt", im.prompt)  # first: the PNG marks the image done
        settings = {
            "prompt": im.prompt,
            "seed": im.seed,
            "steps": steps,
            "guidance": sampler.guidance,
            "width": sampler.size,
            "height": sampler.size,
            "model": model,
            "regularization": True,
        }
        save_png(picture, folder / f"{im.stem}.png", settings, overwrite=True)


def _write_manifest(folder: Path, gen: RegularizationImages, sampler: Sampler, images: list[RegImage]) -> None:
    manifest = {
        "sampler": sampler.__dict__,
        "batch_size": gen.batch_size,
        "images": [{"file": f"{im.stem}.png", "prompt": im.prompt, "seed": im.seed} for im in images],
    }
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
