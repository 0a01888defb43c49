"""SIGTERM / SIGINT: the step in progress finishes, a checkpoint and a LoRA are written, the exit code says so
(143 / 130), and rerunning the same command ends with exactly the LoRA of an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]


def _train(tmp_path: Path, model_dir: Path, out: str, kill: tuple[str, int] | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("KILL_AT", None)
    if kill:
        env.update(KILL_SIGNAL=kill[0], KILL_AT=str(kill[1]))
    cmd = [
        sys.executable,
        str(ROOT / "tests/signal_worker.py"),
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        f"--model.source={model_dir}",
        f"--output_dir={tmp_path / out}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--data.source={ROOT / 'examples/data'}",
        "--sample.prompts=[]",
        "--train.accelerator=cpu",
        "--train.devices=1",
        "--max_steps=5",
        "--lora.dropout=0.1",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
        "--model.gradient_checkpointing=false",
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_stops_cleanly_and_the_rerun_is_exact(tmp_path, tiny_dev_dir, name, code):
    straight = _train(tmp_path, tiny_dev_dir, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = _train(tmp_path, tiny_dev_dir, "stopped", kill=(name, 3))
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert "stopped at step 3; rerun the same command to resume" in stopped.stderr
    out = tmp_path / "stopped"
    assert (out / "checkpoints" / "step000003.ckpt").is_file()
    assert (out / "lora" / "tiny-step000003.safetensors").is_file()
    assert not (out / "tiny.safetensors").exists()  # not finished: no final LoRA
    resumed = _train(tmp_path, tiny_dev_dir, "stopped")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "tiny.safetensors")
    b = load_file(out / "tiny.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k
