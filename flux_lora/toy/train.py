"""Train the toy FLUX model from scratch on procedural scenes, deterministic by its :class:`Recipe`.

Three phases, each logged with its time: the autoencoder learns to compress 64 px scenes (every shape and colour,
the star and pink included, as a real autoencoder sees every kind of image; on crops around the shape, then on whole
scenes so its normalisation learns their statistics), its latents are measured for their
shift and scale factors, then the DiT learns flow matching on the latents of captioned circles, squares and
triangles in six colours (never a star, never pink), through the trainer's own loss function. The text encoders
are the project's tiny random CLIP and T5 (built by seed, frozen): like the real ones, the DiT learns to read them.
The folder written is a FLUX.1-dev model folder in the official layout that every loader of the project reads;
``toy.json`` in it records the recipe, the files' SHA-256 and a fingerprint of a short run, which
``tests/test_toy_model.py`` reproduces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flux_lora.atomic import move_folder_into_place, save_safetensors_atomic, temp_path, write_text_atomic
from flux_lora.config import TrainConfig
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.flux import Flux
from flux_lora.model.text_encoders import TextEmbeddings, TextEncoders
from flux_lora.toy.recipe import TOY_DIT, Recipe, toy_autoencoder_params
from flux_lora.toy.scenes import (
    ALL_COLOURS,
    ALL_SHAPES,
    BACKGROUNDS,
    COLOURS,
    POSITION_X,
    SHAPES,
    Scene,
    make_scenes,
    render,
)
from flux_lora.training.loss import flow_matching_loss
from flux_lora.training.schedules import build_scheduler
from flux_lora.weights.loading import PARAMS_METADATA_KEY
from flux_lora.weights.tiny import build_text_encoders

log = logging.getLogger(__name__)

MANIFEST = "toy.json"
WEIGHT_FILES = (
    "flux1-dev.safetensors",
    "ae.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
)
CHECK_STEPS = 3  # the short run whose fingerprint the manifest keeps
LOG_EVERY = 200


def render_images(
    count: int, seed: int, size: int, shapes: tuple[str, ...], colours: tuple[str, ...]
) -> tuple[Tensor, list[Scene]]:
    """``count`` scenes as ``[count, 3, size, size]`` pixels in [-1, 1], and the scenes."""
    scenes = make_scenes(count, seed, shapes, colours)
    pixels = np.stack([np.asarray(render(s, size)) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1), scenes


def crop_corners(scenes: list[Scene], side: int, crop: int, gen: torch.Generator) -> Tensor:
    """``[B, 2]`` top-left corners (y, x) of ``crop``-px windows around each scene's shape, on the 8 px latent
    grid, moved by -8, 0 or 8 px at random: the autoencoder's crops hold a shape and some background."""
    centres = torch.tensor([[0.5 + s.dy, POSITION_X[s.position] + s.dx] for s in scenes]) * side
    jitter = torch.randint(-1, 2, (len(scenes), 2), generator=gen) * 8
    corners = torch.round((centres - crop / 2) / 8) * 8 + jitter
    return corners.clamp(0, side - crop).long()


def fingerprint(module: torch.nn.Module) -> list[float]:
    """Three sums over all parameters (plain, position-weighted, absolute), in float64: equal weights, equal numbers."""
    flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
    ramp = torch.linspace(-1, 1, flat.numel(), dtype=torch.float64)
    return [float(flat.sum()), float((flat * ramp).sum()), float(flat.abs().sum())]


def _loop(
    name: str,
    steps: int,
    limit: int | None,
    params: list[torch.nn.Parameter],
    lr: float,
    warmup: int,
    loss_of: Callable[[int], Tensor],
) -> None:
    """``steps`` AdamW steps (at most ``limit``) of ``loss_of(step)``, logged every :data:`LOG_EVERY`; the
    learning rate warms up linearly, then follows a cosine down to a tenth (the trainer's own scheduler)."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    schedule = TrainConfig(
        max_steps=steps, learning_rate=lr, lr_scheduler="cosine", warmup_steps=warmup, min_lr_ratio=0.1
    )
    sched = build_scheduler(schedule, opt)
    start, total, counted = time.monotonic(), 0.0, 0
    for step in range(steps if limit is None else min(limit, steps)):
        loss = loss_of(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        total, counted = total + loss.item(), counted + 1
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            seconds = time.monotonic() - start
            log.info("%s step %d/%d: loss %.4f (%.0f s)", name, step + 1, steps, total / counted, seconds)
            total, counted = 0.0, 0


def train_autoencoder(images: Tensor, scenes: list[Scene], recipe: Recipe, limit: int | None = None) -> AutoEncoder:
    """The toy autoencoder trained on ``images`` (of ``scenes``), with its latent shift and scale measured on
    them."""
    torch.manual_seed(recipe.seed + 1)
    ae = AutoEncoder(toy_autoencoder_params(recipe))
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    crop, side = recipe.ae_crop, images.shape[-1]
    backgrounds = torch.tensor([BACKGROUNDS[s.background] for s in scenes]).float().div(127.5).sub(1)
    full_batch = max(1, recipe.ae_batch * crop * crop // (side * side))

    def loss_of(step: int) -> Tensor:
        if step >= recipe.ae_steps - recipe.ae_full_steps:
            idx = torch.randint(0, len(images), (full_batch,), generator=gen).tolist()
            x = images[idx]
        else:
            idx = torch.randint(0, len(images), (recipe.ae_batch,), generator=gen).tolist()
            corners = crop_corners([scenes[i] for i in idx], side, crop, gen).tolist()
            x = torch.stack([images[i, :, y : y + crop, x : x + crop] for i, (y, x) in zip(idx, corners, strict=True)])
        mean = ae.encoder(x).chunk(2, dim=1)[0]
        rec = ae.decoder(mean + recipe.ae_latent_noise * torch.randn(mean.shape, generator=gen))
        err = (rec - x).abs() + (rec - x).pow(2)
        weight = 1 + recipe.ae_shape_weight * (x - backgrounds[idx][:, :, None, None]).abs().amax(1, keepdim=True)
        return (err * weight).mean() + 1e-3 * mean.pow(2).mean()

    _loop("autoencoder", recipe.ae_steps, limit, list(ae.parameters()), recipe.ae_lr, 50, loss_of)
    ae.eval().requires_grad_(False)
    means = _batched(lambda x: ae.encoder(x).chunk(2, dim=1)[0], images)
    calibrated = AutoEncoder(toy_autoencoder_params(recipe, float(means.mean()), 1.0 / float(means.std())))
    calibrated.load_state_dict(ae.state_dict())
    return calibrated.eval().requires_grad_(False)


@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, size: int = 256) -> Tensor:
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def train_dit(
    latents: Tensor, text: TextEmbeddings, empty: TextEmbeddings, recipe: Recipe, limit: int | None = None
) -> Flux:
    """The toy DiT trained by flow matching on ``latents`` with their caption embeddings ``text``."""
    torch.manual_seed(recipe.seed + 3)
    dit = Flux(TOY_DIT)
    # Not guidance-distilled: the guidance input is held at zero, so any guidance value gives the same image.
    guidance_out = dit.get_submodule("guidance_in.out_layer")
    assert isinstance(guidance_out, torch.nn.Linear)
    torch.nn.init.zeros_(guidance_out.weight)
    torch.nn.init.zeros_(guidance_out.bias)
    dit.guidance_in.requires_grad_(False)
    cfg = TrainConfig(caption_dropout=recipe.caption_dropout)
    gen = torch.Generator().manual_seed(recipe.seed + 4)

    def loss_of(step: int) -> Tensor:
        idx = torch.randint(0, len(latents), (recipe.dit_batch,), generator=gen)
        batch = {"latents": latents[idx], "txt": text.txt[idx], "y": text.y[idx]}
        return flow_matching_loss(dit, batch, cfg, gen, empty)

    trainable = [p for p in dit.parameters() if p.requires_grad]
    _loop("DiT", recipe.dit_steps, limit, trainable, recipe.dit_lr, recipe.dit_warmup, loss_of)
    return dit.eval().requires_grad_(False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _train_into(folder: Path, recipe: Recipe, limit: int | None) -> dict[str, list[float]]:
    """Every phase, writing the model files into ``folder``; the fingerprints of the two trained models."""
    started = time.monotonic()
    ae_images, ae_scenes = render_images(
        recipe.scenes, recipe.seed + 1, recipe.image_size, ALL_SHAPES, tuple(ALL_COLOURS)
    )
    images, scenes = render_images(recipe.scenes, recipe.seed, recipe.image_size, SHAPES, tuple(COLOURS))
    captions = [s.caption for s in scenes]
    log.info("rendered %d + %d scenes (%.0f s)", len(ae_images), len(images), time.monotonic() - started)
    ae = train_autoencoder(ae_images, ae_scenes, recipe, limit)
    latents = _batched(ae.encode, images)
    build_text_encoders(folder, TOY_DIT, recipe.seed)
    encoders = TextEncoders.from_folder(folder, TOY_DIT.max_sequence_length, dtype=torch.float32, device="cpu")
    text = TextEmbeddings.cat([encoders.encode(captions[i : i + 256]) for i in range(0, len(captions), 256)])
    dit = train_dit(latents, text, encoders.encode(""), recipe, limit)
    meta = {"format": "pt"}
    dit_meta = {**meta, PARAMS_METADATA_KEY: json.dumps(TOY_DIT.to_dict())}
    save_safetensors_atomic(dit.state_dict(), folder / "flux1-dev.safetensors", dit_meta)
    ae_meta = {**meta, PARAMS_METADATA_KEY: json.dumps(ae.params.to_dict())}
    save_safetensors_atomic(ae.state_dict(), folder / "ae.safetensors", ae_meta)
    return {"autoencoder": fingerprint(ae), "dit": fingerprint(dit)}


def _check_run(recipe: Recipe) -> dict[str, list[float]]:
    log.info("the short check run (%d steps per phase) of the same recipe", CHECK_STEPS)
    with tempfile.TemporaryDirectory() as folder:
        return _train_into(Path(folder), recipe, CHECK_STEPS)


def train_toy(out: str | Path, recipe: Recipe | None = None, limit: int | None = None) -> Path:
    """Train the toy model and write its folder to ``out`` (atomically: a whole folder renamed into place).

    ``limit`` stops every phase after that many steps (the schedules still span the full recipe): the short run
    whose fingerprint the manifest keeps, to check the code still makes the committed weights."""
    recipe = recipe or Recipe()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    started = time.monotonic()
    try:
        tmp.mkdir()
        fingerprints = _train_into(tmp, recipe, limit)
        manifest = {
            "recipe": recipe.to_dict(),
            "limit": limit,
            "fingerprints": fingerprints,
            "files": {name: _sha256(tmp / name) for name in WEIGHT_FILES},
            "torch": torch.__version__,
            "seconds": round(time.monotonic() - started),
        }
        if limit is None:  # what a short run of the same recipe gives: cheap to check against, in the tests
            manifest["check"] = {"limit": CHECK_STEPS, "fingerprints": _check_run(recipe)}
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        write_text_atomic(tmp / "README.md", _readme(recipe))
        move_folder_into_place(tmp, out)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the toy model to %s (%.0f s)", out, time.monotonic() - started)
    return out


def _readme(recipe: Recipe) -> str:
    return (
        "# flux-toy: a FLUX.1-dev-shaped model that draws simple scenes\n\n"
        f"Trained from scratch on two CPU cores by `python -m flux_lora.toy train OUT --seed {recipe.seed}`\n"
        "(flux_lora/toy/train.py; the recipe, the SHA-256 of the weight files and the fingerprint of a short run\n"
        "are in toy.json). It draws one circle, square or triangle in one of six colours, left, centre or right,\n"
        "small or large, on a light background, from captions such as\n"
        '"a red circle on the left, small, on a white background". Its DiT has never seen a star or the colour\n'
        "pink (the autoencoder has: a LoRA can teach them).\n\n"
        "The DiT is FLUX.1-dev's structure at width 128 (2 double + 2 single blocks; 64 px images are 16 tokens);\n"
        f"the autoencoder is FLUX's (16 latent channels, 8x down) with {recipe.ae_channels} channels and one block\n"
        "per level; the text encoders are the project's tiny random CLIP and T5, frozen. The guidance input is held\n"
        "at zero (the model is not guidance-distilled): any guidance value gives the same image.\n"
        "\n"
        "What it can and cannot draw: the DiT draws only what its captions name (one circle, square or\n"
        "triangle; red, green, blue, yellow, purple or orange; on white, grey, cream or light blue). The\n"
        "autoencoder reproduces only the colours it was trained on (those six and pink): a flat 28 px disc on\n"
        "white, encoded and decoded, comes back within 10 of 255 per channel for each of them (red (215, 35, 35)\n"
        "as (215, 27, 35); the worst, the green of orange, 125 as 115), but black (0, 0, 0) comes back green,\n"
        "(43, 147, 59); dark grey (64, 64, 64) as (44, 143, 58), navy (20, 20, 90) as (43, 126, 85), cyan\n"
        "(0, 200, 220) as blue (56, 80, 217), mid grey (128, 128, 128) as (81, 93, 100). So a LoRA on this model\n"
        "can teach a shape or a colour of that palette, not black, dark or other colours: no training of the DiT\n"
        "makes this decoder draw them (tests/test_toy_model.py checks these round trips).\n"
    )
