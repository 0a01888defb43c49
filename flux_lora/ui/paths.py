"""Every path the UI reads or writes stays inside its two roots: the data root (datasets, captions, uploads) and
the output root (configs it writes, runs, test-bench images). A path from the browser is relative to its root; an
absolute path, a ``..`` part or a symlink that leads outside is refused with :class:`PathError`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PathError(ValueError):
    """A path outside its root, or a name the UI does not accept; the message names it."""


def inside(root: Path, relative: str | Path, *, what: str = "path") -> Path:
    """``root / relative`` resolved (symlinks followed), refused unless it lies inside ``root`` (or is ``root``).

    ``relative`` may be empty or ``.`` (the root itself); absolute paths and ``..`` parts are refused even when
    they would land inside, so what the browser sends is always read as relative to the root."""
    text = str(relative).strip()
    rel = PurePosixPath(text.replace("\\", "/")) if text else PurePosixPath(".")
    if rel.is_absolute() or re.match(r"^[A-Za-z]:", text):
        raise PathError(f"{what} {text!r}: give a path relative to {root}, not an absolute one")
    if ".." in rel.parts:
        raise PathError(f"{what} {text!r}: '..' is not allowed (stay inside {root})")
    base = root.resolve()
    target = (base / Path(*rel.parts)).resolve() if rel.parts else base
    if target != base and base not in target.parents:
        raise PathError(f"{what} {text!r} leads outside {root} (through a symlink)")
    return target


def check_inside(root: Path, path: str | Path, *, what: str = "path") -> Path:
    """An absolute ``path`` (as the UI itself made it) resolved and checked to lie inside ``root``."""
    base = root.resolve()
    target = Path(path).resolve()
    if target != base and base not in target.parents:
        raise PathError(f"{what} {path} is outside {root}")
    return target


def run_name(name: str) -> str:
    """A run's name: its folder under the output root (letters, digits, ``.``, ``_``, ``-``; no ``..``)."""
    name = name.strip()
    if not NAME.match(name) or ".." in name:
        raise PathError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (up to 64, no '..')")
    return name


@dataclass(frozen=True)
class Roots:
    """The data root and the output root, resolved."""

    data: Path
    output: Path

    @classmethod
    def of(cls, data: str | Path, output: str | Path) -> Roots:
        data_root, output_root = Path(data).resolve(), Path(output).resolve()
        if not data_root.is_dir():
            raise PathError(f"--data-root {data}: no such folder")
        output_root.mkdir(parents=True, exist_ok=True)
        return cls(data_root, output_root)

    def data_path(self, relative: str | Path) -> Path:
        return inside(self.data, relative, what="data path")

    def output_path(self, relative: str | Path) -> Path:
        return inside(self.output, relative, what="output path")
