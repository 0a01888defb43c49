"""Resident memory of a process tree from ``/proc`` (Linux): total, anonymous, file-backed and shared, in bytes.

``VmRSS = RssAnon + RssFile + RssShmem``. Anonymous pages are what a process allocated; file-backed pages are
mapped files (a memory-mapped checkpoint counts here while it is mapped, although the kernel may drop those
pages again). :func:`file_rss` counts the resident pages of one file's own mappings (``/proc/PID/smaps``), which
other mapped files do not change. ``PeakSampler`` polls a tree in a thread and keeps the peak of each figure per
phase.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def status(pid: int | str = "self") -> dict[str, int]:
    """``FIELDS`` and ``VmHWM`` of one process, in bytes (empty once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in (*FIELDS, "VmHWM"):
            out[name] = int(value.split()[0]) * 1024  # kB
    return out


def file_rss(path: str | Path, pid: int | str = "self") -> int:
    """Bytes of ``path``'s pages resident in the mappings of that file in one process (the ``Rss`` of its
    ``/proc/PID/smaps`` entries); 0 when the file is not mapped."""
    target = str(Path(path).resolve())
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    total, inside = 0, False
    for line in text.splitlines():
        first = line.split(maxsplit=1)[0] if line else ""
        if "-" in first and not first.endswith(":"):  # a mapping's header: "start-end perms offset dev inode path"
            parts = line.split(maxsplit=5)
            inside = len(parts) == 6 and parts[5] == target
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024  # kB
    return total


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return found


def tree_memory(pid: int) -> dict[str, int]:
    """``FIELDS`` summed over ``pid`` and its descendants."""
    total = dict.fromkeys(FIELDS, 0)
    for p in descendants(pid):
        s = status(p)
        for k in FIELDS:
            total[k] += s.get(k, 0)
    return total


class PeakSampler:
    """Poll ``measure()`` every ``interval`` seconds in a thread; ``peaks[phase][field]`` is the largest value
    seen while ``phase`` (set by the caller at any time) was current."""

    def __init__(self, measure: Callable[[], dict[str, int]], interval: float = 0.2):
        self.measure, self.interval = measure, interval
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        values = self.measure()
        peak = self.peaks.setdefault(self.phase, dict.fromkeys(FIELDS, 0))
        for k in {*FIELDS, *values}:  # FIELDS, and any other figure ``measure`` gives
            peak[k] = max(peak.get(k, 0), values.get(k, 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)
