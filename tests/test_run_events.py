"""The run's events file (``<output_dir>/events.jsonl``) and its control requests (``control/save-now``,
``control/sample-now``), on the tiny model: what a run reports, and that a request adds files without changing
the trained LoRA."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
from safetensors.torch import load_file

import flux_lora.training.run as run_module
from flux_lora.training.events import EventLog, read_events, request
from flux_lora.training.guards import StoppedBySignal

from helpers.training import tiny_config

ARGS = (
    "--max_steps=3",
    "--train.save_every_n_steps=0",
    "--train.checkpoint_every_n_steps=0",
    "--lora.dropout=0.1",  # random draws in every step: a request that moved the RNG would change the LoRA
    "--caption_dropout=0.3",
    "--model.gradient_checkpointing=false",
    "--sample.prompts=[a red circle]",
    "--sample.steps=1",
    "--sample.at_start=false",
)


def _by_kind(events: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for e in events:
        kinds.setdefault(e["event"], []).append(e)
    return kinds


def test_read_events_skips_a_partial_line_and_request_writes_the_file(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("start", step=0, max_steps=2, name="x", resumed_from=None, pid=1)
    log.emit("step", step=1, loss=float("nan"), lr=1e-4, steps_per_s=None, eta_s=None)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"t": 1.0, "event": "ste')  # a writer caught mid-line
    events = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["start", "step"]
    assert events[1]["loss"] is None and isinstance(events[0]["t"], float)  # NaN is not JSON: null
    assert read_events(tmp_path) == events  # the output folder works as well
    assert read_events(tmp_path / "missing.jsonl") == []
    assert request(tmp_path, "save-now") == tmp_path / "control" / "save-now"
    assert (tmp_path / "control" / "save-now").read_bytes() == b""
    with pytest.raises(ValueError, match="unknown request 'stop'"):
        request(tmp_path, "stop")  # type: ignore[arg-type]


def test_requests_add_outputs_and_leave_the_final_lora_unchanged(tmp_path, tiny_dev_dir):
    straight = tiny_config(tmp_path / "a", tiny_dev_dir, *ARGS)
    run_module.run(straight)
    asked = tiny_config(tmp_path / "b", tiny_dev_dir, *ARGS)
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")
    out = asked.output_path
    request(out, "save-now")  # before training: acted on after the first optimizer step
    request(out, "sample-now")
    run_module.run(asked)

    assert not any((out / "control").iterdir())  # both consumed
    assert (out / "lora" / "tiny-step000001.safetensors").is_file()
    assert (out / "checkpoints" / "step000001.ckpt").is_file()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000001-0.png", "step000003-0.png"]
    a = load_file(straight.output_path / "tiny.safetensors")
    b = load_file(out / "tiny.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k  # bit for bit

    kinds = _by_kind(read_events(out / "events.jsonl"))
    (start,) = kinds["start"]
    assert (start["step"], start["max_steps"], start["name"], start["resumed_from"]) == (0, 3, "tiny", None)
    assert [e["step"] for e in kinds["step"]] == [1, 2, 3]  # log_every_n_steps=1
    assert all(e["loss"] > 0 and e["lr"] > 0 and e["steps_per_s"] > 0 and e["eta_s"] >= 0 for e in kinds["step"])
    assert [(e["step"], Path(e["path"]).name) for e in kinds["checkpoint"]] == [
        (1, "step000001.ckpt"),
        (3, "step000003.ckpt"),
    ]
    assert [(e["step"], e["path"]) for e in kinds["lora"]] == [
        (1, str(out / "lora" / "tiny-step000001.safetensors")),
        (3, str(out / "tiny.safetensors")),
    ]
    assert [(e["step"], Path(e["path"]).name, e["prompt"], e["seed"]) for e in kinds["sample"]] == [
        (1, "step000001-0.png", "a red circle", 0),
        (3, "step000003-0.png", "a red circle", 0),
    ]
    (end,) = kinds["end"]
    assert (end["step"], end["status"]) == (3, "finished") and end["message"].startswith("trained 3 steps")
    assert all(
        Path(e["path"]).is_absolute() and Path(e["path"]).is_file() for k in ("lora", "sample") for e in kinds[k]
    )


class _AtStep(L.Callback):
    """Asks for a save at step 1 and sends this process SIGTERM at step 2."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            request(self.out, "save-now")
        elif trainer.global_step == 2:
            signal.raise_signal(signal.SIGTERM)


def test_a_stopped_and_resumed_run_reports_both_parts(tmp_path, tiny_dev_dir, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_dev_dir, *ARGS[:-3], "--max_steps=4")
    out = cfg.output_path
    real_build = run_module.build

    def build(cfg, scanned=None):
        trainer, module, datamodule = real_build(cfg, scanned)
        trainer.callbacks.append(_AtStep(out))
        return trainer, module, datamodule

    with monkeypatch.context() as m:
        m.setattr(run_module, "build", build)
        with pytest.raises(StoppedBySignal) as stopped:
            run_module.run(cfg)
    at = stopped.value.step  # the step in progress when the signal came is finished first
    first = read_events(out / "events.jsonl")
    end = first[-1]
    assert (end["event"], end["status"], end["step"]) == ("end", "stopped", at)
    assert end["message"] == f"stopped at step {at}; rerun the same command to resume"
    # the save-now asked for in step 1's callbacks is acted on after step 2 (the check ran before it was made)
    assert [e["step"] for e in _by_kind(first)["lora"]][0] == 2

    run_module.run(cfg)  # the same command again resumes
    kinds = _by_kind(read_events(out / "events.jsonl"))
    assert [e["step"] for e in kinds["start"]] == [0, at]
    assert kinds["start"][0]["resumed_from"] is None
    assert kinds["start"][1]["resumed_from"] == str(out / "checkpoints" / f"step{at:06d}.ckpt")
    assert [e["status"] for e in kinds["end"]] == ["stopped", "finished"] and kinds["end"][1]["step"] == 4


class _Fails(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        raise RuntimeError("worker traceback line\nboom at step 1")


def test_a_failed_run_ends_with_its_one_line_error(tmp_path, tiny_dev_dir, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_dev_dir, *ARGS[:-3])
    real_build = run_module.build

    def build(cfg, scanned=None):
        trainer, module, datamodule = real_build(cfg, scanned)
        trainer.callbacks.append(_Fails())
        return trainer, module, datamodule

    monkeypatch.setattr(run_module, "build", build)
    with pytest.raises(RuntimeError, match="boom"):
        run_module.run(cfg)
    events = read_events(cfg.output_path)
    assert events[0]["event"] == "start" and [e["event"] for e in events].count("end") == 1
    assert (events[-1]["event"], events[-1]["status"], events[-1]["step"]) == ("end", "failed", 1)
    assert events[-1]["message"] == "boom at step 1"  # the error's last line
