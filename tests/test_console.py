"""What a person reads: with stderr redirected (nohup, Slurm), periodic step lines, every line once, no
third-party noise, start and end summaries; a finished run says so and claims nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _train(tmp_path: Path, model_dir: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        f"--model.source={model_dir}",
        f"--output_dir={tmp_path / 'run'}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--data.source={ROOT / 'examples/data'}",
        "--sample.prompts=[]",
        "--train.accelerator=cpu",
        "--max_steps=4",
        "--train.log_every_n_steps=2",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
        "--model.gradient_checkpointing=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _messages(text: str) -> list[str]:
    """Log messages without timestamp, level and logger (so a line printed by two handlers in two formats
    counts twice); the cache fill's tqdm bars are left out."""
    lines = [re.sub(r"^(\S+ \S+ [A-Z]+ \S+: |[A-Z]+: )", "", line) for line in text.splitlines() if line.strip()]
    return [line for line in lines if "it/s]" not in line and "image/s]" not in line and "caption/s]" not in line]


def test_redirected_output_is_readable(tmp_path, tiny_dev_dir):
    first = _train(tmp_path, tiny_dev_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = _messages(first.stderr + first.stdout)
    repeated = [line for line, n in Counter(lines).items() if n > 1]
    assert not repeated, repeated
    text = "\n".join(lines)
    assert re.search(r"step 2/4  loss \d\.\d+ \(smoothed\)  lr \S+  [\d.]+ steps/s  ETA", text)
    assert "step 4/4" in text
    assert "training tiny: model" in text and "65,536 trainable parameters" in text and "buckets" in text
    assert "trained 4 steps in this run" in text and "tiny.safetensors" in text
    for noise in ("litlogger", "LeafSpec", "TPU available", "logging interval", "Epoch "):
        assert noise not in text, noise
    again = _train(tmp_path, tiny_dev_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished at step 4, nothing trained" in again.stderr
    assert "LoRA written" not in again.stderr
