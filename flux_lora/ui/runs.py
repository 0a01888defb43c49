"""Runs: the YAML the UI writes, ``train.py --config`` as a child process, a queue that runs one job after another.

A run is a folder ``<output root>/<name>/``: the UI writes ``run.yaml`` there (the same YAML ``python train.py
--config`` takes), starts ``train.py --config run.yaml`` with the console log in ``console.log``, stops it with
SIGTERM (the trainer checkpoints and exits 143) and resumes it by starting it again (the trainer resumes from its
last checkpoint). Folders with a run's ``config.yaml`` or ``events.jsonl`` started from the command line in the
same output root are listed too.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flux_lora.atomic import write_text_atomic
from flux_lora.config import load_config
from flux_lora.ui.events import EVENTS_FILE, tail
from flux_lora.ui.paths import PathError, Roots, check_inside, run_name

log = logging.getLogger(__name__)

RUN_CONFIG = "run.yaml"
CONSOLE_LOG = "console.log"
EXIT_MEANING = {0: "finished", 143: "stopped (checkpoint written)", 130: "stopped (checkpoint written)"}


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["a"]["b"] = value`` for ``key`` ``"a.b"`` (creating the sections)."""
    *sections, last = key.split(".")
    node = config
    for s in sections:
        node = node.setdefault(s, {})
    node[last] = value


def build_config(
    template: dict[str, Any], roots: Roots, name: str, datasets: list[str], overrides: dict[str, Any]
) -> str:
    """The YAML of a run: ``template`` with its name, its output folder under the output root, its datasets (paths
    relative to the data root) and ``overrides`` (dotted keys, as ``train.py --key value`` takes them)."""
    config = yaml.safe_load(yaml.safe_dump(template)) or {}  # a deep copy
    name = run_name(name)
    config["name"] = name
    config["output_dir"] = str(roots.output / name)
    if datasets:
        data = config.setdefault("data", {})
        data.pop("source", None)
        data["datasets"] = [{"source": str(roots.data_path(d))} for d in datasets]
    for key, value in overrides.items():
        set_dotted(config, key, value)
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def check_config(text: str, roots: Roots) -> tuple[str, Path]:
    """``(name, output folder)`` of a run YAML, checked as ``train.py`` checks it (a one-line error otherwise), with
    its output folder a run folder of the output root and its local datasets inside the data root."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"the YAML does not parse: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ValueError("the YAML is not a mapping of sections")
    name = run_name(str(config.get("name", "")))
    out = check_inside(roots.output, str(config.get("output_dir", "")), what="output_dir")
    if out.parent != roots.output:
        raise PathError(f"output_dir {out} must be a run folder directly under {roots.output}")
    data = config.get("data") or {}
    sources = [data.get("source")] + [d.get("source") for d in data.get("datasets") or [] if isinstance(d, dict)]
    for source in filter(None, sources):
        if Path(source).is_absolute() or Path(source).exists() or str(source).startswith((".", "~")):
            check_inside(roots.data, str(source), what="data source")
    return name, out


@dataclass
class Job:
    name: str
    folder: Path

    @property
    def config(self) -> Path:
        return self.folder / RUN_CONFIG

    @property
    def console(self) -> Path:
        return self.folder / CONSOLE_LOG


class RunManager:
    """Starts, stops and queues ``train.py`` child processes, one at a time."""

    def __init__(self, roots: Roots, python: str = sys.executable, train_script: str = "train.py") -> None:
        self.roots = roots
        self.python, self.train_script = python, train_script
        self.queue: list[Job] = []
        self.current: tuple[Job, subprocess.Popen[bytes]] | None = None
        self.exit_codes: dict[str, int] = {}
        self.stopping: set[str] = set()  # sent SIGTERM, still writing its checkpoint
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ writing and starting

    def save(self, text: str) -> Job:
        """Check the YAML and write it to ``<output root>/<name>/run.yaml`` (atomically)."""
        name, folder = check_config(text, self.roots)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RUN_CONFIG
        write_text_atomic(path, text)
        try:
            load_config(path)  # unknown keys and bad values, as train.py reports them
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return Job(name, folder)

    def enqueue(self, job: Job) -> str:
        """Queue ``job``; it starts at once when nothing runs."""
        with self._lock:
            running = self.current is not None and self.current[0].name == job.name and job.name not in self.stopping
            if running or any(j.name == job.name for j in self.queue):
                return f"{job.name} is already running or queued"
            self.queue.append(job)
        self._ensure_thread()
        self.poll()
        with self._lock:
            started = self.current is not None and self.current[0] is job
            return f"{job.name}: " + ("started" if started else f"queued ({len(self.queue)})")

    def stop(self, name: str) -> str:
        """SIGTERM to the run's process (it checkpoints and exits 143), or take it out of the queue."""
        with self._lock:
            if self.current and self.current[0].name == name and self.current[1].poll() is None:
                self.current[1].send_signal(signal.SIGTERM)
                self.stopping.add(name)
                return f"{name}: stop requested (SIGTERM: the trainer writes a checkpoint and exits)"
            for job in self.queue:
                if job.name == name:
                    self.queue.remove(job)
                    return f"{name}: taken out of the queue"
        return f"{name} is not running from this UI"

    def resume(self, name: str) -> str:
        """Start the run again from its ``run.yaml``: the trainer resumes from its last checkpoint."""
        folder = self.roots.output_path(run_name(name))
        if not (folder / RUN_CONFIG).is_file():
            raise ValueError(f"{folder / RUN_CONFIG} does not exist: start the run from a config first")
        return self.enqueue(Job(name, folder))

    def running_name(self) -> str | None:
        with self._lock:
            return self.current[0].name if self.current and self.current[1].poll() is None else None

    def poll(self) -> None:
        """Record a finished child's exit status and start the next queued job."""
        with self._lock:
            if self.current is not None:
                job, proc = self.current
                code = proc.poll()
                if code is None:
                    return
                self.exit_codes[job.name] = code
                self.stopping.discard(job.name)
                self.current = None
            if self.queue:
                job = self.queue.pop(0)
                self.current = (job, self._start(job))
                self.exit_codes.pop(job.name, None)

    def _start(self, job: Job) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(job.console, "ab") as console:
            return subprocess.Popen(
                [self.python, self.train_script, "--config", str(job.config)],
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="flux-lora-ui-queue", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self.poll()
            time.sleep(0.5)

    def shutdown(self, timeout: float = 120) -> None:
        """Stop the running child when the UI exits (SIGTERM: it checkpoints) and wait for it; the queue is
        dropped."""
        with self._lock:
            self.queue.clear()
            proc = self.current[1] if self.current else None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the run (process %d) did not stop in %.0f s", proc.pid, timeout)

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        """Run folders of the output root: the UI's and the command line's."""
        found = [
            p.name
            for p in sorted(self.roots.output.iterdir())
            if p.is_dir()
            and not p.is_symlink()
            and any((p / f).is_file() for f in (RUN_CONFIG, "config.yaml", EVENTS_FILE))
        ]
        return found

    def status(self, name: str) -> str:
        """running / queued / finished / stopped / failed, with the child's last error line."""
        if self.running_name() == name:
            return "stopping (writing its checkpoint)" if name in self.stopping else "running"
        if any(j.name == name for j in self.queue):
            return "queued"
        folder = self.roots.output_path(run_name(name))
        code = self.exit_codes.get(name)
        if code is not None:
            meaning = EXIT_MEANING.get(code, f"failed (exit {code})")
            error = last_error(folder / CONSOLE_LOG) if code not in (0,) else None
            return meaning + (f": {error}" if error and code not in EXIT_MEANING else "")
        return "not running from this UI"


def last_error(console: Path) -> str | None:
    """The child's last ERROR (or, failing that, WARNING) line, without the timestamp."""
    if not console.is_file():
        return None
    lines = tail(console, 400)
    for level in (" ERROR ", " WARNING "):
        for line in reversed(lines):
            if level in line:
                return line.split(level, 1)[1].split(": ", 1)[-1].strip()
    return lines[-1].strip() if lines else None
