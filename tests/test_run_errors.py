"""Failures of a training run answer with one line naming the file and the exit status README documents
(2 bad config, data or output folder; 3 a file could not be written; 130 / 143 stopped by a signal), never a
traceback: disk full, a read-only output folder, a cache entry damaged during training, a NaN init LoRA, a
signal during the cache fill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train
from flux_lora import atomic
from flux_lora.data import cache as cache_module
from flux_lora.training import run as run_module

ROOT = Path(__file__).parents[1]


def _argv(tmp_path: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--config=configs/tiny.yaml",
        f"--model.source={model_dir}",
        f"--output_dir={tmp_path / 'run'}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--data.source={ROOT / 'examples/data'}",
        "--sample.prompts=[]",
        "--train.accelerator=cpu",
        "--train.devices=1",
        "--max_steps=2",
        "--train.log_every_n_steps=1",
        *extra,
    ]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def _one_line_error(caplog, capsys) -> str:
    errors = _errors(caplog)
    assert len(errors) == 1, errors
    assert "\n" not in errors[0]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in capsys.readouterr().err
    return errors[0]


def _full_disk_for(monkeypatch, tmp_path: Path, kind: str) -> None:
    """Writes of files whose name holds ``kind`` go to /dev/full: the real write fails with ENOSPC."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    real = atomic.temp_path

    def temp_path(path: Path) -> Path:
        tmp = real(path)
        if kind in str(path):
            tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(atomic, "temp_path", temp_path)


@pytest.mark.parametrize("kind", [".ckpt", "/cache/text/"], ids=["checkpoint", "cache"])
def test_disk_full_is_one_line_naming_the_file(kind, tmp_path, tiny_dev_dir, monkeypatch, caplog, capsys):
    _full_disk_for(monkeypatch, tmp_path, kind)
    assert train.main(_argv(tmp_path, tiny_dev_dir, "--train.checkpoint_every_n_steps=1")) == 3
    line = _one_line_error(caplog, capsys)
    assert "No space left on device" in line, line
    folder = tmp_path / ("run/checkpoints" if kind == ".ckpt" else "cache")
    assert str(folder) in line and ".tmp" not in line, line


@pytest.mark.parametrize("folder", ["/sys/flux-lora-cannot-write", "read-only"])
def test_a_read_only_output_dir_stops_before_any_model_loads(
    folder, tmp_path, tiny_dev_dir, monkeypatch, caplog, capsys
):
    if folder == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        folder = str(tmp_path / "ro" / "run")
    monkeypatch.setattr(run_module, "fetch_model_folder", lambda cfg: pytest.fail("the model was fetched"))
    argv = [*_argv(tmp_path, tiny_dev_dir), f"--output_dir={folder}"]
    assert train.main(argv) == 2
    line = _one_line_error(caplog, capsys)
    assert line.startswith(f"output_dir {folder} cannot be written"), line


def test_a_cache_entry_damaged_during_training_is_named(tmp_path, tiny_dev_dir, monkeypatch, caplog, capsys):
    from flux_lora.data.datamodule import FluxDataModule

    real_setup = FluxDataModule.setup

    def setup_then_damage(self, stage=None):
        real_setup(self, stage)  # the cache is complete and verified: training starts
        for entry in sorted((tmp_path / "cache").rglob("*.safetensors")):  # every entry: the first step reads some
            data = bytearray(entry.read_bytes())
            data[-16:] = bytes(16)
            entry.write_bytes(bytes(data))

    monkeypatch.setattr(FluxDataModule, "setup", setup_then_damage)
    assert train.main(_argv(tmp_path, tiny_dev_dir, "--data.num_workers=0")) == 2
    line = _one_line_error(caplog, capsys)
    assert "cache entry" in line and str(tmp_path / "cache") in line and "rerun" in line, line


def test_a_nan_init_lora_stops_before_the_cache_and_the_model(tmp_path, tiny_dev_dir, monkeypatch, caplog, capsys):
    from flux_lora.lora.files import write_lora
    from flux_lora.model.flux import PRESETS
    from flux_lora.weights.tiny import random_flux

    from helpers.lora import random_lora

    params = PRESETS["tiny"]
    lora = random_lora(random_flux(params, 0), ["double_blocks.0.img_attn.qkv"])
    for w in lora.values():
        w.up[0, 0] = float("nan")
    path = write_lora(tmp_path / "nan.safetensors", lora, params)
    monkeypatch.setattr("flux_lora.data.datamodule.fill_cache", lambda *a, **k: pytest.fail("the cache was filled"))
    monkeypatch.setattr(run_module, "load_flow_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert train.main(_argv(tmp_path, tiny_dev_dir, f"--train.init_lora={path}")) == 2
    line = _one_line_error(caplog, capsys)
    assert line.startswith(f"train.init_lora: {path}: ") and "NaN" in line, line


def test_ctrl_c_during_the_cache_fill_exits_130(tmp_path, tiny_dev_dir, monkeypatch, caplog):
    real = cache_module._encode_texts

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_encode_texts", interrupted)
    assert train.main(_argv(tmp_path, tiny_dev_dir)) == 130
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("rerun the same command" in w for w in warnings), warnings
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
from flux_lora.data import cache
real = cache._encode_texts
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
cache._encode_texts = killed
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_during_the_cache_fill_exits_143_with_the_message(tmp_path, tiny_dev_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER.format(root=str(ROOT)), *_argv(tmp_path, tiny_dev_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 143, done.stderr[-2000:]
    assert "rerun the same command" in done.stderr and "Traceback" not in done.stderr


def test_only_the_process_that_writes_the_lora_says_so(tmp_path, tiny_dev_dir, monkeypatch, caplog):
    """Under DDP every rank returns from fit; only rank 0 writes the LoRA, so only it may log "LoRA written"
    (rank 1 said so before rank 0 had written it). Here the one process plays rank 1."""
    import lightning as L

    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    assert train.main(_argv(tmp_path, tiny_dev_dir, "--train.checkpoint_every_n_steps=0")) == 0
    assert not [r for r in caplog.records if "LoRA written" in r.getMessage()]
    assert not (tmp_path / "run" / "tiny.safetensors").exists()
