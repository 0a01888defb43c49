"""The full-size dry run's script (benchmarks/dry_run.py) end to end on its tiny preset: model folder, 2 training
steps with the shipped dev config, one generated image, and a JSON with every phase timed and measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.dry_run import run_child
from flux_lora.model.flux import PRESETS
from flux_lora.weights.loading import load_flow_model
from flux_lora.weights.safetensors_io import read_metadata
from flux_lora.weights.streamed import write_random_dit
from flux_lora.weights.tiny import random_flux

ROOT = Path(__file__).parents[1]
TRAIN_PHASES = ["startup", "cache", "load + quantize + LoRA", "steps", "save", "exit"]
GENERATE_PHASES = ["load", "denoise", "decode + write"]


def test_tiny_dry_run_measures_every_phase(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/dry_run.py", str(tmp_path), "--preset", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "dry_run.json").read_text())
    assert list(result["train"]["phases"]) == TRAIN_PHASES
    assert list(result["generate"]["phases"]) == GENERATE_PHASES
    for child in ("train", "generate"):
        assert result[child]["exit_code"] == 0
        for name, row in result[child]["phases"].items():
            assert row["seconds"] >= 0, name
            assert 0 < row["peak_RssAnon_GB"] <= row["peak_VmRSS_GB"], (child, name, row)
    assert (tmp_path / "generated.png").is_file() and (tmp_path / "train" / "flux-dev-lora.safetensors").is_file()
    assert "| train: steps |" in (tmp_path / "dry_run.md").read_text()
    assert not (tmp_path / "model").exists()  # deleted without --keep


def test_phases_follow_the_child_log_and_a_failure_is_reported(tmp_path: Path) -> None:
    child = (
        "import sys, time; b = bytearray(60_000_000); print('hello'); time.sleep(0.5); print('MARK two', flush=True); "
        "time.sleep(0.5); sys.exit(3)"
    )
    r = run_child([sys.executable, "-c", child], tmp_path / "child.log", "one", (("two", r"^MARK"),))
    assert r["exit_code"] == 3
    assert list(r["phases"]) == ["one", "two"]
    assert r["phases"]["two"]["seconds"] >= 0.4 and r["phases"]["two"]["peak_RssAnon_GB"] > 0
    assert (tmp_path / "child.log").read_text() == "hello\nMARK two\n"


def test_streamed_dit_file_holds_the_model_in_memory_order(tmp_path: Path) -> None:
    """The streamed writer's file is a valid safetensors file whose tensors have the model's shapes, bf16 values
    in a sane range, and the metadata asked for; our loader reads it."""
    params = PRESETS["tiny"]
    path = write_random_dit(tmp_path / "flux1-dev.safetensors", params, metadata={"k": "v"})
    assert read_metadata(path) == {"k": "v"}
    model = load_flow_model(path, params, dtype=__import__("torch").float32)
    loaded, fresh = model.state_dict(), random_flux(params, 0).state_dict()
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in fresh.items()}
    for key, t in loaded.items():
        assert t.isfinite().all() and 0 < t.abs().max() <= 1.5, key
