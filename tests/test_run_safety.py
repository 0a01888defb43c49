"""A run never reports work it did not do: NaN stops it, resume picks the right state or refuses, before any
model loads."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flux_lora.config import load_config
from flux_lora.data.cache import CacheStore
from flux_lora.training import run as run_module
from flux_lora.training.callbacks import ADAPTERS_SHA_KEY, AtomicCheckpointIO
from flux_lora.training.guards import NonFiniteLossError
from flux_lora.training.resume import RunMismatchError, find_checkpoint
from flux_lora.training.run import run

ROOT = Path(__file__).parents[1]


def cfg_for(tmp_path: Path, model_dir: Path, *overrides: str, data: Path | None = None):
    return load_config(
        ROOT / "configs/tiny.yaml",
        [
            f"--model.source={model_dir}",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.source={data or ROOT / 'examples/data'}",
            "--sample.prompts=[]",
            "--train.accelerator=cpu",
            "--train.devices=1",
            "--train.save_every_n_steps=0",
            "--train.checkpoint_every_n_steps=0",
            "--model.gradient_checkpointing=false",
            *overrides,
        ],
    )


def _all_finite(path: Path) -> bool:
    if path.suffix == ".ckpt":
        tensors = torch.load(path, weights_only=True)["state_dict"].values()
    else:
        tensors = load_file(path).values()
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_nan_loss_stops_the_run_naming_images_and_captions(tmp_path, tiny_dev_dir):
    cfg = cfg_for(tmp_path, tiny_dev_dir, "--max_steps=1", "--output_dir", str(tmp_path / "fill"))
    run(cfg)  # fills the cache
    store = CacheStore(cfg.data.cache_dir)
    for path in (Path(cfg.data.cache_dir) / "latents").rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            name, latents = f.metadata()["image"], f.get_tensor("latents")
        if name.endswith("green_triangle.png"):  # an encoder that overflowed: NaN, with a valid checksum
            store.write_latent(path.stem, torch.full_like(latents, float("nan")), name)
    cfg = cfg_for(
        tmp_path, tiny_dev_dir, "--max_steps=8", "--train.save_every_n_steps=1", "--train.checkpoint_every_n_steps=1"
    )
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg)
    message = str(err.value)
    assert "green_triangle.png" in message and "a green triangle" in message and "at step " in message
    out = cfg.output_path
    assert not (out / "tiny.safetensors").exists()
    written = [*(out / "checkpoints").glob("*.ckpt"), *(out / "lora").glob("*.safetensors")]
    assert all(_all_finite(p) for p in written)


def test_changed_settings_stop_before_any_model_loads(tmp_path, tiny_dev_dir, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "examples/data", data)
    assert run(cfg_for(tmp_path, tiny_dev_dir, "--max_steps=2", data=data)) is not None
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()

    def no_model(cfg):
        raise AssertionError("a model was fetched or loaded")

    monkeypatch.setattr(run_module, "fetch_model_folder", no_model)
    for override, key in [
        ("--train.learning_rate=1.0e-3", "train.learning_rate (0.003 -> 0.001)"),
        ("--lora.rank=4", "lora.rank (8 -> 4)"),
    ]:
        with pytest.raises(RunMismatchError, match=r"--train.resume false") as err:
            run(cfg_for(tmp_path, tiny_dev_dir, "--max_steps=4", override, data=data))
        assert key in str(err.value)
    (data / "red_circle.txt").write_text("a red circle, edited")
    with pytest.raises(RunMismatchError, match=r"data.images"):
        run(cfg_for(tmp_path, tiny_dev_dir, "--max_steps=4", data=data))
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml  # written only after the checks


def test_finished_run_trains_nothing_and_more_steps_continue(tmp_path, tiny_dev_dir, caplog):
    cfg = cfg_for(tmp_path, tiny_dev_dir, "--max_steps=2")
    run(cfg)
    lora = cfg.output_path / "tiny.safetensors"
    before = lora.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert run(cfg) is None
    assert "already finished at step 2, nothing trained" in caplog.text
    assert lora.stat().st_mtime_ns == before
    # more steps is a safe change; checkpoint_every_n_steps 0 checkpoints only at the end
    run(cfg_for(tmp_path, tiny_dev_dir, "--max_steps=3"))
    assert sorted(p.name for p in (cfg.output_path / "checkpoints").iterdir()) == [
        "step000002.ckpt",
        "step000003.ckpt",
    ]


def test_resume_false_twice_then_a_plain_rerun_continues_the_newest(tmp_path, tiny_dev_dir):
    def lr(value: str, *more: str):
        return cfg_for(tmp_path, tiny_dev_dir, f"--train.learning_rate={value}", *more)

    run(lr("1.0e-3", "--max_steps=1"))
    run(lr("2.0e-3", "--max_steps=1", "--train.resume=false"))
    run(lr("3.0e-3", "--max_steps=1", "--train.resume=false"))
    out = tmp_path / "run"
    moved = sorted(out.glob("previous-*"))
    assert len(moved) == 2 and all((m / "checkpoints").is_dir() and (m / "tiny.safetensors").is_file() for m in moved)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step000001.ckpt"]
    run(lr("3.0e-3", "--max_steps=2"))  # the plain rerun continues the newest experiment...
    assert find_checkpoint(out / "checkpoints").step == 2
    with pytest.raises(RunMismatchError, match="train.learning_rate"):  # ...and no older one
        run(lr("2.0e-3", "--max_steps=3"))


def test_resume_picks_the_newest_loadable_checkpoint(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    state = {"lora_A": torch.ones(2, 2)}
    for step in (2, 4, 6, 8):
        torch.save({"global_step": step, "state_dict": state}, folder / f"step{step:06d}.ckpt")
    torch.save({"global_step": 1, "state_dict": state}, folder / "last.ckpt")
    raw = (folder / "step000004.ckpt").read_bytes()
    (folder / "step000004.ckpt").write_bytes(raw[: len(raw) // 2])  # truncated
    (folder / "step000006.ckpt").write_bytes(b"")  # zero bytes
    # adapters changed after writing: fails its checksum
    torch.save({"global_step": 8, "state_dict": state, ADAPTERS_SHA_KEY: "0" * 64}, folder / "step000008.ckpt")
    with caplog.at_level(logging.WARNING):
        found = find_checkpoint(folder)
    assert found.step == 2 and found.path.name == "step000002.ckpt"
    for name in ("step000004.ckpt", "step000006.ckpt", "step000008.ckpt"):
        assert str(folder / name) in caplog.text


def test_no_lora_of_a_non_finite_step_is_written(tmp_path, tiny_dev_dir):
    """A LoRA every step and a learning rate that blows up: the step the error names, and every later one, has
    no LoRA and no checkpoint, so "nothing was written since" is true."""
    cfg = cfg_for(
        tmp_path,
        tiny_dev_dir,
        "--max_steps=30",
        "--train.learning_rate=1e6",
        "--train.lr_scheduler=constant",
        "--train.warmup_steps=0",
        "--train.save_every_n_steps=1",
        "--train.log_every_n_steps=10",
    )
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg)
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert "nothing was written since" in str(err.value)
    steps = [int(re.search(r"step(\d+)", p.name).group(1)) for p in (cfg.output_path / "lora").glob("*.safetensors")]
    steps += [int(re.search(r"step(\d+)", p.name).group(1)) for p in (cfg.output_path / "checkpoints").glob("*.ckpt")]
    assert steps and max(steps) < step, (step, sorted(steps))


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_intact_one(tmp_path, caplog):
    """4,000 bytes flipped in the middle of the newest checkpoint (the zip's directory intact, the adapters'
    checksum too): the one before it is chosen, with a one-line warning naming the damaged file."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    adapters = {"lora_A": torch.ones(4, 4)}
    for step in (2, 4):
        state = {
            "global_step": step,
            "state_dict": adapters,
            "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(200_000)}}}],
        }
        AtomicCheckpointIO().save_checkpoint(state, folder / f"step{step:06d}.ckpt")
    newest = folder / "step000004.ckpt"
    raw = bytearray(newest.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4000] = bytes(b ^ 0xFF for b in raw[middle : middle + 4000])
    newest.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        found = find_checkpoint(folder)
    assert found is not None and found.path.name == "step000002.ckpt"
    warnings = [r.getMessage() for r in caplog.records if str(newest) in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]


def test_keep_checkpoints_holds_across_resumes(tmp_path, tiny_dev_dir):
    """save.keep_checkpoints 2 over several continued runs, one of them killed between writing a checkpoint and
    removing the oldest (an extra older file left): 2 checkpoints remain, the newest."""
    folder = tmp_path / "run" / "checkpoints"
    for steps in (2, 3, 5):
        run(cfg_for(tmp_path, tiny_dev_dir, f"--max_steps={steps}", "--train.checkpoint_every_n_steps=1"))
        assert sorted(p.name for p in folder.iterdir()) == [f"step{steps - 1:06d}.ckpt", f"step{steps:06d}.ckpt"]
        if steps == 3:  # what a kill -9 after step 3's checkpoint and before step 1's removal leaves
            shutil.copy(folder / "step000002.ckpt", folder / "step000001.ckpt")


def _steps_of(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["ss_steps"]


def test_a_finished_run_without_its_final_loras_writes_them_from_the_final_checkpoint(tmp_path, tiny_dev_dir, caplog):
    """A kill -9 after the final step's checkpoint and before the final LoRA (and its EMA) were written: the rerun
    writes them from that checkpoint, the same as an uninterrupted run's, and says so."""
    cfg = cfg_for(tmp_path, tiny_dev_dir, "--max_steps=2", "--ema.enabled=true")
    final = run(cfg)
    out = cfg.output_path
    expected = {p.name: load_file(p) for p in (out / "tiny.safetensors", out / "tiny_ema.safetensors")}
    for name in expected:
        (out / name).unlink()
    with caplog.at_level(logging.INFO):
        assert run(cfg) == final
    assert "nothing trained" not in caplog.text and "final LoRA" in caplog.text
    for name, tensors in expected.items():
        again = load_file(out / name)
        assert again.keys() == tensors.keys() and all(again[k].equal(tensors[k]) for k in tensors), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step000002.ckpt"]  # nothing trained


def test_more_steps_keep_the_previous_final_lora_as_a_step_file(tmp_path, tiny_dev_dir):
    """--max_steps 3 on a finished 2-step run: the 2-step LoRA is kept as lora/tiny-step000002.safetensors."""
    first = run(cfg_for(tmp_path, tiny_dev_dir, "--max_steps=2"))
    two_steps = load_file(first)
    final = run(cfg_for(tmp_path, tiny_dev_dir, "--max_steps=3"))
    kept = first.parent / "lora" / "tiny-step000002.safetensors"
    assert _steps_of(kept) == "2" and _steps_of(final) == "3"
    assert all(load_file(kept)[k].equal(v) for k, v in two_steps.items())
