"""Files and folders a run writes: atomic tiny model, stale temporaries, the output lock (umask: test_atomic)."""

from __future__ import annotations

import os

import pytest

from flux_lora.config import ExperimentConfig
from flux_lora.training.resume import OutputInUseError, clean_stale_temps, output_lock
from flux_lora.weights import tiny


def test_interrupted_tiny_model_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "build_text_encoders", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny.write_tiny_model(tmp_path / "models" / "tiny")
    assert list((tmp_path / "models").iterdir()) == []  # no partial model, no temporary folder
    monkeypatch.undo()
    folder = tiny.write_tiny_model(tmp_path / "models" / "tiny")
    assert (folder / "flux1-dev.safetensors").is_file() and (folder / "text_encoder_2").is_dir()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]


def test_a_second_run_on_one_output_folder_is_refused_naming_the_first(tmp_path):
    with (
        output_lock(tmp_path / "out"),
        pytest.raises(OutputInUseError, match=rf"in use by process {os.getpid()} on "),
        output_lock(tmp_path / "out"),
    ):
        pass
    with output_lock(tmp_path / "out"):  # released when the holder ends
        pass


def test_stale_temporaries_are_removed(tmp_path):
    cfg = ExperimentConfig(output_dir=str(tmp_path / "out"))
    out = cfg.output_path
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / "checkpoints" / ".step000006.ckpt.4242.0a1b2c3d.tmp", out / ".tiny.safetensors.99.ffff0000.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    kept = out / "checkpoints" / "step000004.ckpt"
    kept.write_bytes(b"x")
    assert clean_stale_temps(out) == 2
    assert not any(p.exists() for p in stale) and kept.exists()
