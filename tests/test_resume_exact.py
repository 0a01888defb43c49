"""Resume is bit-exact whatever the stops: two stops at consecutive epoch ends (a signal's stop or a run that
ended at max_steps and was continued), and a tiny model written on first use does not move the seed."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from flux_lora.weights.tiny import write_tiny_model

from helpers.training import fit, tiny_config

# 8 images at batch size 2: 4 steps an epoch, so steps 4, 8 and 12 end epochs
EXACT_ARGS = [
    "--lora.dropout=0.1",
    "--caption_dropout=0.3",
    "--data.crop=random",
    "--data.flip=true",
    "--model.gradient_checkpointing=false",
    "--train.log_every_n_steps=4",
]


def _sigterm_at(step: int) -> L.Callback:
    """Sends this process SIGTERM during optimizer step ``step``: the trainer's own signal stop ends the fit."""

    class SelfSignal(L.Callback):
        def on_before_backward(self, trainer, module, loss):
            if trainer.global_step + 1 == step:
                os.kill(os.getpid(), signal.SIGTERM)

    return SelfSignal()


def _assert_same_lora(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, (
        f"{len(different)} tensors differ, max {max(float((x[k] - y[k]).abs().max()) for k in different)}"
    )


def _straight(tmp_path: Path, model_dir: Path, *args: str) -> Path:
    cfg = tiny_config(tmp_path / "straight", model_dir, *args)
    fit(cfg)
    return cfg.output_path / "tiny.safetensors"


def _stop_after(step: int) -> L.Callback:
    """Requests a stop after optimizer step ``step`` from the end of the callback list (the checkpoint of that
    step is then written in ``on_train_end``, with Lightning's epoch closed)."""

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step >= step:
                trainer.should_stop = True

    return Stop()


@pytest.mark.parametrize("stop", [_sigterm_at, _stop_after], ids=["sigterm", "should_stop"])
def test_two_stops_at_consecutive_epoch_ends_are_exact(tmp_path, tiny_dev_dir, stop):
    """A stop in step 4 (an epoch's last), resume, a stop in step 8 (the next epoch's last), resume to the end:
    the LoRA equals a straight run's bit for bit."""
    args = [*EXACT_ARGS, "--max_steps=12", "--train.checkpoint_every_n_steps=10", "--train.save_every_n_steps=10"]
    straight = _straight(tmp_path, tiny_dev_dir, *args)
    cfg = tiny_config(tmp_path / "stopped", tiny_dev_dir, *args)
    shutil.copytree(tmp_path / "straight" / "cache", tmp_path / "stopped" / "cache")
    for at in (4, 8):
        trainer, _ = fit(cfg, stop(at))
        assert trainer.global_step == at
    trainer, _ = fit(cfg)
    assert trainer.global_step == 12
    _assert_same_lora(straight, cfg.output_path / "tiny.safetensors")


def test_max_steps_4_then_8_then_12_equals_12(tmp_path, tiny_dev_dir):
    """A finished run continued twice with more steps (constant schedule) equals one run of all the steps."""
    args = [
        *EXACT_ARGS,
        "--train.lr_scheduler=constant",
        "--train.warmup_steps=0",
        "--train.checkpoint_every_n_steps=4",
    ]
    straight = _straight(tmp_path, tiny_dev_dir, *args, "--max_steps=12")
    shutil.copytree(tmp_path / "straight" / "cache", tmp_path / "continued" / "cache")
    for steps in (4, 8, 12):
        cfg = tiny_config(tmp_path / "continued", tiny_dev_dir, *args, f"--max_steps={steps}")
        trainer, _ = fit(cfg)
        assert trainer.global_step == steps
    _assert_same_lora(straight, cfg.output_path / "tiny.safetensors")


@pytest.mark.parametrize("seed", [0, 7])
def test_writing_the_tiny_model_leaves_the_global_rng_alone(tmp_path, seed):
    torch.manual_seed(seed)
    before = torch.get_rng_state()
    write_tiny_model(tmp_path / "tiny", variant="dev", seed=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_run_that_writes_the_tiny_model_trains_what_later_runs_do(tmp_path):
    """model.tiny_if_missing: the first run writes the model and fills the cache, a second one does neither; with
    LoRA dropout (global RNG) and caption dropout both give the same LoRA."""
    model = tmp_path / "tiny-model"
    args = ["--max_steps=2", "--lora.dropout=0.1", "--caption_dropout=0.3", "--model.tiny_if_missing=true"]
    loras = []
    for name in ("first", "second"):
        cfg = tiny_config(tmp_path / name, model, *args, f"--data.cache_dir={tmp_path / 'cache'}")
        fit(cfg)
        loras.append(cfg.output_path / "tiny.safetensors")
    _assert_same_lora(*loras)
