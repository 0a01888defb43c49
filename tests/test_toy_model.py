"""The committed toy model (models/flux-toy): its files are what its manifest says, a short run of its recipe
reproduces the manifest's fingerprint (so code and weights cannot drift apart), it draws its own prompts, and the
quick start's LoRA teaches it the colour it has never seen (pink)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from benchmarks.toy_quality import BASES, generate, load_pipeline, prompt_accuracy
from flux_lora.cli.train import main as train_main
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.model.autoencoder import Encoder
from flux_lora.toy.cli import score_files, summary
from flux_lora.toy.recipe import TOY_DIT, Recipe
from flux_lora.toy.scenes import ALL_SHAPES, make_scenes, parse_caption
from flux_lora.toy.scorer import accuracy, score_image
from flux_lora.toy.train import MANIFEST, render_images, train_autoencoder, train_toy

ROOT = Path(__file__).parents[1]
TOY = ROOT / "models" / "flux-toy"
HELD_OUT_SEED = 1000  # the toy model trained on the scenes of seed 0


def _manifest(folder: Path = TOY) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def test_committed_files_are_the_manifests():
    manifest = _manifest()
    assert manifest["recipe"] == Recipe().to_dict(), "the recipe changed: retrain (python -m flux_lora.toy train)"
    assert manifest["limit"] is None
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((TOY / name).read_bytes()).hexdigest() == digest, name


def test_a_short_run_of_the_recipe_reproduces_the_manifests_fingerprint(tmp_path):
    check = _manifest()["check"]
    out = train_toy(tmp_path / "toy", limit=check["limit"])
    got = _manifest(out)["fingerprints"]
    # Both phases are deterministic (the tiny T5 tokenizer was not: its ids changed from build to build and moved
    # the DiT's sums by up to 0.03); the tolerance is for other CPUs' float rounding, far under what a change of
    # the seed, the data, the loss or the architecture moves.
    assert got["autoencoder"] == pytest.approx(check["fingerprints"]["autoencoder"], rel=1e-6)
    assert got["dit"] == pytest.approx(check["fingerprints"]["dit"], abs=1e-3)


def test_the_autoencoder_ends_on_whole_images():
    """Crops train it cheaply, but GroupNorm and the attention then learn a crop's statistics: trained on crops
    only, the autoencoder committed before drew squares with fill 0.96 on crops and 0.90 (read as circles, 58 %)
    on whole images. Its last ``ae_full_steps`` steps therefore see whole images, as many pixels per batch as the crops.
    (The short check run above stops before that phase; this covers it.)"""
    recipe = Recipe(scenes=8, ae_steps=4, ae_full_steps=2, ae_batch=8)
    images, scenes = render_images(recipe.scenes, 0, recipe.image_size, ALL_SHAPES, ("red", "pink"))
    shapes: list[tuple[int, ...]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, Encoder):
            shapes.append(tuple(args[0].shape))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train_autoencoder(images, scenes, recipe)
    finally:
        handle.remove()
    assert shapes[:4] == [(8, 3, 32, 32)] * 2 + [(2, 3, 64, 64)] * 2


@pytest.fixture(scope="module")
def toy_pipe() -> FluxPipeline:
    return FluxPipeline.from_pretrained(TOY, dtype=torch.float32, device="cpu")


def test_the_toy_model_loads_as_flux_dev(toy_pipe):
    assert toy_pipe.dit.params == TOY_DIT


def test_the_base_model_draws_its_own_prompts(toy_pipe):
    """96 held-out captions, one image each, judged by the scorer. Measured (models/flux-toy as committed):
    colour 100 %, position 100 %, size 96 %, shape 88 % (the misses: squares drawn round), every attribute
    right in 86 %. The bounds sit a few images under those figures; 80 % is what the toy model promises."""
    prompts = [s.caption for s in make_scenes(96, HELD_OUT_SEED)]
    images = toy_pipe(prompts, height=64, width=64, seed=0, progress=False)
    pairs = [(score_image(img).labels, parse_caption(p)) for img, p in zip(images, prompts, strict=True)]
    result = accuracy(pairs)
    every = sum(seen == wanted for seen, wanted in pairs) / len(pairs)
    assert result["colour"] >= 0.95 and result["position"] >= 0.95 and result["size"] >= 0.9, result
    assert result["shape"] >= 0.8 and every >= 0.8, (every, result)


def test_the_quick_start_teaches_pink_and_keeps_the_rest(tmp_path):
    """configs/toy.yaml (the README's main job): the share of pink prompts drawn pink rises by >= 60 points from
    the step-0 previews to the final ones, while on the 54 keep previews (every shape, colour, position; no pink)
    the colour stays right in >= 90 % and the shape within 5 points of step 0's, as the toy scorer judges them.
    Measured: pink 0 -> 100 %, keep colour 98 % (the quick start without its regularization images: 15 %)."""
    argv = ["--config", str(ROOT / "configs/toy.yaml"), f"--output_dir={tmp_path}", f"--data.cache_dir={tmp_path}/c"]
    assert train_main([*argv, f"--model.source={TOY}", "--quantize", "float8_e4m3fn"]) == 0
    scored = score_files(sorted((tmp_path / "samples").glob("*.png")))
    steps = sorted({s.step for s in scored})
    assert steps[0] == 0 and len(steps) == 2
    pink = {
        step: [s.verdict.labels.colour == "pink" for s in scored if s.step == step and not s.keep] for step in steps
    }
    before, after = (sum(pink[s]) / len(pink[s]) for s in steps)
    assert after - before >= 0.6, summary(scored)
    keep = {step: [(s.verdict.labels, s.expected) for s in scored if s.step == step and s.keep] for step in steps}
    base, trained = (accuracy(keep[s]) for s in steps)
    assert len(keep[steps[-1]]) == 54
    assert trained["colour"] >= 0.9 and trained["shape"] >= base["shape"] - 0.05, summary(scored)


def test_fp8_draws_as_bf16_does():
    """The seed's claim at toy scale (benchmarks/toy_quality.py has the full table): on the same seeds, the fp8
    base's images differ from the bf16 base's by under 1 of 255 per pixel on average (measured 0.23 on 48
    prompts) and the scorer finds at most one image more or less right."""
    prompts = [s.caption for s in make_scenes(16, HELD_OUT_SEED)]
    bases = {b.name: b for b in BASES}
    images = {n: generate(load_pipeline(TOY, bases[n]), prompts) for n in ("bf16", "fp8 scaled (default)")}
    error = abs(images["bf16"].astype(float) - images["fp8 scaled (default)"]).mean()
    right = {n: prompt_accuracy(im, prompts)["all"] * len(prompts) for n, im in images.items()}
    assert error < 1.0, error
    assert abs(right["bf16"] - right["fp8 scaled (default)"]) <= 1, right


def _round_trip_disc(ae, rgb: tuple[int, int, int]) -> tuple[int, ...]:
    """A flat 28 px disc of ``rgb`` on white through the autoencoder: the mean colour inside it."""
    from PIL import Image, ImageDraw

    from flux_lora.data.cache import image_to_tensor

    image = Image.new("RGB", (64, 64), (250, 250, 250))
    ImageDraw.Draw(image).ellipse((18, 18, 46, 46), fill=rgb)
    with torch.no_grad():
        out = ae.decode(ae.encode(image_to_tensor(image)[None]))[0].clamp(-1, 1)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    inside = (yy - 32) ** 2 + (xx - 32) ** 2 <= 100
    return tuple(round(float(v)) for v in ((out[:, inside].mean(1) + 1) * 127.5))


def test_the_autoencoder_keeps_its_palette_and_turns_black_green(toy_pipe):
    """What models/flux-toy/README.md says the toy can and cannot draw: the seven colours it was trained on come
    back within 10 of 255 per channel (12 allowed for float differences between machines); black and dark colours
    come back green."""
    from flux_lora.toy.scenes import ALL_COLOURS

    for name, rgb in ALL_COLOURS.items():
        got = _round_trip_disc(toy_pipe.ae, rgb)
        assert max(abs(a - b) for a, b in zip(got, rgb, strict=True)) <= 12, (name, rgb, got)
    r, g, b = _round_trip_disc(toy_pipe.ae, (0, 0, 0))
    assert g > 120 and r < 70 and b < 90, (r, g, b)
