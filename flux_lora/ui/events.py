"""What the UI reads from a run folder and the requests it leaves there.

The trainer's ``events.jsonl`` (``flux_lora.training.events``: start, step, checkpoint, lora, sample, end) is the
first source. A run folder without it (a trainer from before the events file) is read from what every run writes:
``logs/metrics.csv`` for the curves, ``samples/step*.png`` for the previews, ``checkpoints/`` and the console log.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from flux_lora.training import events as trainer_events

EVENTS_FILE = "events.jsonl"
CONTROL_DIR = "control"
Request = Literal["save-now", "sample-now"]


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of ``path`` (``events.jsonl``), oldest first; lines that do not parse are skipped."""
    return trainer_events.read_events(path)


def request(output_dir: Path, what: Request) -> Path:
    """Leave a ``save-now`` or ``sample-now`` request for the trainer in ``output_dir/control/``."""
    return trainer_events.request(output_dir, what)


CONSOLE_STEP = re.compile(r"step (\d+)/(\d+)\s+loss ([\d.eE+-]+).*?lr ([\d.eE+-]+)\s+([\d.]+) steps/s\s+ETA (\S+)")


@dataclass
class RunView:
    """One run folder as the Runs page shows it."""

    step: int = 0
    max_steps: int | None = None
    steps_per_s: float | None = None
    eta: str | None = None
    curve: list[tuple[int, str, float]] = field(default_factory=list)  # (step, "loss"|"lr", value)
    previews: list[tuple[str, str]] = field(default_factory=list)  # (png path, "step N: prompt")
    checkpoints: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)  # start and end lines
    status: str | None = None  # the last end event's status
    pid: int | None = None


def view(folder: Path, console_log: Path | None = None) -> RunView:
    """Everything the Runs page shows about ``folder``, from its events or, without them, its files."""
    out = RunView()
    events = read_events(folder / EVENTS_FILE)
    for e in events:
        kind = e.get("event")
        if kind == "start":
            out.max_steps, out.pid, out.status = e.get("max_steps"), e.get("pid"), None
            out.step = int(e.get("step") or 0)
            resumed = f", resumed from {e['resumed_from']}" if e.get("resumed_from") else ""
            out.summaries.append(f"start at step {out.step} of {out.max_steps}{resumed}")
        elif kind == "step":
            out.step = int(e["step"])
            out.steps_per_s, eta = e.get("steps_per_s"), e.get("eta_s")
            out.eta = None if eta is None else _duration(float(eta))
            out.curve += [(out.step, "loss", float(e["loss"])), (out.step, "lr", float(e["lr"]))]
        elif kind == "checkpoint":
            out.checkpoints.append(str(e["path"]))
        elif kind == "lora":
            out.loras.append(str(e["path"]))
        elif kind == "sample":
            out.previews.append((str(e["path"]), f"step {e['step']}: {e.get('prompt', '')}"))
        elif kind == "end":
            out.status = str(e.get("status"))
            out.step = int(e.get("step", out.step))
            out.summaries.append(f"end at step {e.get('step')}: {e.get('status')}: {e.get('message', '')}")
    if not any(e.get("event") == "step" for e in events):  # the console's progress lines, else Lightning's CSV
        _console_progress(out, console_log)
        out.curve = out.curve or _metrics_curve(folder / "logs" / "metrics.csv")
    if not any(e.get("event") == "sample" for e in events):
        out.previews = [(str(p), _preview_caption(p)) for p in sorted(folder.glob("samples/step*.png"))]
    if not out.checkpoints:
        out.checkpoints = [str(p) for p in sorted(folder.glob("checkpoints/*.ckpt"))]
    if not out.loras:
        out.loras = [str(p) for p in sorted(folder.glob("**/*.safetensors")) if "cache" not in p.parts]
    return out


def _preview_caption(png: Path) -> str:
    """``step N: prompt`` of a preview PNG (its A1111 ``parameters`` text holds the prompt first)."""
    step = f"step {int(png.name[4:10])}" if png.name[4:10].isdigit() else png.stem
    try:
        with Image.open(png) as image:
            prompt = str(getattr(image, "text", {}).get("parameters", "")).split("\n")[0]
    except OSError:
        prompt = ""
    return f"{step}: {prompt}" if prompt else step


def _metrics_curve(path: Path) -> list[tuple[int, str, float]]:
    if not path.is_file():
        return []
    curve = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for column, series in (("train/loss", "loss"), ("train/lr", "lr")):
                if row.get(column):
                    curve.append((int(row["step"]) + 1, series, float(row[column])))
    return curve


def _console_progress(out: RunView, console_log: Path | None) -> None:
    if console_log is None or not console_log.is_file():
        return
    for line in tail(console_log, 2000):
        if m := CONSOLE_STEP.search(line):
            out.step, out.max_steps = int(m.group(1)), int(m.group(2))
            out.steps_per_s, out.eta = float(m.group(5)), m.group(6)
            out.curve += [(out.step, "loss", float(m.group(3))), (out.step, "lr", float(m.group(4)))]


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a text file (reads at most its last 256 KiB)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - (1 << 18)))
        return f.read().decode("utf-8", errors="replace").splitlines()[-lines:]


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"
