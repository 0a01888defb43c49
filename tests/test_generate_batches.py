"""examples/generate.py: several seeds, --num-images, --batch-size and image to image (--image --strength)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_lora.inference.pipeline import FluxPipeline

from helpers.cli import load_generate

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
ARGS = ["--prompt", "a cat", "--height", "32", "--width", "32", "--steps", "2", "--dtype", "float32"]
ARGS += ["--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def generate():
    return load_generate()


def _px(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _settings(path: Path) -> dict:
    return json.loads(Image.open(path).text["flux_lora"])


def test_several_seeds_and_batches_give_each_seed_its_own_image(tiny_dev_dir, tmp_path, generate):
    base = ["--model", str(tiny_dev_dir), *ARGS]
    batch = generate.main([*base, "--seed", "3", "9", "--batch-size", "2", "--output", str(tmp_path / "b.png")])
    single = generate.main([*base, "--seed", "9", "--output", str(tmp_path / "s.png")])[0]
    assert [_settings(p)["seed"] for p in batch] == [3, 9]
    assert np.abs(_px(batch[1]) - _px(single)).max() <= 2  # same noise; batched matmuls may round differently
    assert not np.array_equal(_px(batch[0]), _px(batch[1]))
    counted = generate.main([*base, "--seed", "9", "--num-images", "2", "--output", str(tmp_path / "n.png")])
    assert [_settings(p)["seed"] for p in counted] == [9, 10]
    assert (tmp_path / "n-0.png").read_bytes() == single.read_bytes()


def test_seed_and_count_errors(tiny_dev_dir, generate, capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--model", str(tiny_dev_dir), *ARGS, "--seed", "1", "2", "--num-images", "3"])
    assert "2 seeds but --num-images 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.parse_args(["--model", str(tiny_dev_dir), *ARGS, "--strength", "0.5"])
    assert "--strength is for image to image" in capsys.readouterr().err


def test_image_to_image_from_the_command_line(tiny_dev_dir, tmp_path, generate, caplog):
    init = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(init)
    args = ["--model", str(tiny_dev_dir), "--prompt", "a cat", "--steps", "4", "--dtype", "float32", "--device", "cpu"]
    with caplog.at_level(logging.WARNING):
        out = generate.main(
            [*args, "--seed", "1", "--image", str(init), "--strength", "0", "--output", str(tmp_path / "o.png")]
        )[0]
    assert Image.open(out).size == (32, 32) and "rounded down to 32x32" in caplog.text
    settings = _settings(out)
    assert (settings["strength"], settings["image"]) == (0.0, str(init))
    assert "Denoising strength: 0.0" in Image.open(out).text["parameters"]
    pipe = FluxPipeline.from_pretrained(tiny_dev_dir, dtype=torch.float32, device="cpu")
    expected = pipe(
        "a cat",
        height=32,
        width=32,
        num_inference_steps=4,
        seed=1,
        image=Image.open(init),
        strength=0.0,
        progress=False,
    )[0]
    assert np.array_equal(_px(out), np.asarray(expected).astype(int))  # the autoencoder round trip, no DiT step
