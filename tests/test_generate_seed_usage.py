"""The usage the project's seed documents (a negative prompt through true CFG, embedded guidance 3.5, 50 steps)
works as written, from the command line: the settings are used and recorded."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from helpers.cli import load_generate

ARGS = ["--prompt", "a photo of a dog", "--height", "32", "--width", "32", "--dtype", "float32", "--device", "cpu"]


def test_negative_prompt_guidance_and_fifty_steps(tiny_dev_dir, tmp_path):
    generate = load_generate()
    base = ["--model", str(tiny_dev_dir), *ARGS, "--seed", "0", "--quiet"]
    seeded = [*base, "--guidance", "3.5", "--steps", "50"]
    (plain,) = generate.main([*seeded, "--output", str(tmp_path / "plain.png")])
    (cfg,) = generate.main(
        [
            *seeded,
            "--negative-prompt",
            "blurry, low quality",
            "--true-cfg",
            "2.0",
            "--output",
            str(tmp_path / "cfg.png"),
        ]
    )
    settings = json.loads(Image.open(cfg).text["flux_lora"])
    assert (settings["steps"], settings["guidance"], settings["true_cfg"]) == (50, 3.5, 2.0)
    assert settings["negative_prompt"] == "blurry, low quality"
    assert "Negative prompt: blurry, low quality" in Image.open(cfg).text["parameters"]
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(cfg)))
