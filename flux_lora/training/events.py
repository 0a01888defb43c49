"""What a run tells scripts and the web UI: ``<output_dir>/events.jsonl``, and the requests they can make of it in
``<output_dir>/control/``.

The events file is append-only (a resumed run appends), one JSON object per line, each with ``t`` (unix time) and
``event`` (start, step, checkpoint, lora, sample, end), written by global rank 0 only. Each line goes out in one
``write`` on a file opened with ``O_APPEND``, so a reader sees whole lines and at most a partial last one, which
:func:`read_events` skips. A request is an empty file, ``control/save-now`` or ``control/sample-now``: the trainer
looks for it after each optimizer step, deletes it and acts on it
(:class:`flux_lora.training.callbacks.ControlRequests`).

No torch or Lightning here: the UI imports this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from flux_lora.atomic import write_bytes_atomic

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
CONTROL_DIR = "control"
Request = Literal["save-now", "sample-now"]
REQUESTS: tuple[Request, ...] = ("save-now", "sample-now")
Status = Literal["finished", "stopped", "failed"]


def _plain(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null (a loss not read yet, a rate with no steps)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventLog:
    """Appends events to ``path``; the callers write only on global rank 0."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def emit(self, event: str, **fields: Any) -> None:
        """One line ``{"t": ..., "event": event, **fields}``, appended in a single write and flushed. A file that
        cannot be written is logged once per event, never stops the run."""
        record = {"t": time.time(), "event": event, **{k: _plain(v) for k, v in fields.items()}}
        line = (json.dumps(record, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not append to %s: %s", self.path, e)


def events_path(output_dir: Path) -> Path:
    return Path(output_dir) / EVENTS_FILE


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event in ``path`` (an events file, or the output folder holding one), oldest first; lines that do
    not parse as a JSON object with an ``event`` (a partial last line) are skipped. A missing file: ``[]``."""
    path = Path(path)
    if path.is_dir():
        path = events_path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events


def request(output_dir: Path, what: Request) -> Path:
    """Ask the run writing to ``output_dir`` to save (``save-now``: a LoRA and a checkpoint) or to draw its
    previews (``sample-now``) after its current optimizer step: creates the empty request file, atomically."""
    if what not in REQUESTS:
        raise ValueError(f"unknown request {what!r}: one of {', '.join(REQUESTS)}")
    return write_bytes_atomic(Path(output_dir) / CONTROL_DIR / what, b"")


def pending(output_dir: Path, what: Request) -> bool:
    """Whether the request file ``what`` is there (one stat)."""
    return (Path(output_dir) / CONTROL_DIR / what).exists()


def consume(output_dir: Path, what: Request) -> None:
    """Delete the request file ``what`` (acted on)."""
    (Path(output_dir) / CONTROL_DIR / what).unlink(missing_ok=True)


def one_line(error: BaseException) -> str:
    """An error as one line: its last non-empty line (a DataLoader worker's error carries a traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
