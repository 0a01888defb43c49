"""Training previews people look at (a step-0 baseline, per-prompt settings, PNGs that record what made them)
and the retention of what a run keeps."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from flux_lora.training.run import run

from helpers.training import tiny_config


def test_previews_have_their_own_settings_and_record_them(tmp_path, tiny_dev_dir):
    previews = json.dumps(
        [
            "a red circle",
            {"prompt": "a red circle", "seed": 7, "height": 32, "width": 48},
            {"prompt": "a red circle", "negative_prompt": "a blue square", "true_cfg": 3.0},
        ]
    )
    cfg = tiny_config(
        tmp_path,
        tiny_dev_dir,
        "--max_steps=2",
        f"--sample.prompts={previews}",
        "--sample.steps=2",
        "--sample.height=64",
        "--sample.width=64",
    )
    run(cfg)
    samples = cfg.output_path / "samples"
    names = sorted(p.name for p in samples.glob("*.png"))
    assert names == [f"step00000{s}-{i}.png" for s in (0, 2) for i in range(3)]  # baseline and end
    plain, seeded, negative = (samples / f"step000002-{i}.png" for i in range(3))
    assert Image.open(plain).size == (64, 64) and Image.open(seeded).size == (48, 32)
    meta = [json.loads(Image.open(p).text["flux_lora"]) for p in (plain, seeded, negative)]
    assert [(m["seed"], m["true_cfg"], m["negative_prompt"]) for m in meta] == [
        (0, 1.0, ""),
        (7, 1.0, ""),
        (0, 3.0, "a blue square"),
    ]
    assert all(m["step"] == 2 and m["lora"] == "tiny" and m["prompt"] == "a red circle" for m in meta)
    pixels = [np.asarray(Image.open(p)) for p in (plain, negative)]
    assert not np.array_equal(*pixels)  # same seed and prompt: only true CFG against the negative differs


def test_checkpoints_kept_follow_save_keep_checkpoints(tmp_path, tiny_dev_dir):
    cfg = tiny_config(tmp_path, tiny_dev_dir, "--max_steps=4", "--train.checkpoint_every_n_steps=1")
    cfg.save.keep_checkpoints = 3
    run(cfg)
    kept = sorted(p.name for p in (cfg.output_path / "checkpoints").glob("*.ckpt"))
    assert kept == ["step000002.ckpt", "step000003.ckpt", "step000004.ckpt"]
