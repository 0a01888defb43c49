"""The entry points: the generate program as a module, small settings for it, and a fresh ``python``
process from a given directory with this checkout importable."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "examples" / "generate.py"
# tiny, fast and deterministic settings of examples/generate.py
GENERATE_ARGS = [
    *("--prompt", "a photo of a dog", "--height", "32", "--width", "48", "--steps", "2"),
    *("--dtype", "float32", "--device", "cpu", "--quiet"),
]


def load_generate() -> ModuleType:
    """The generate program (``flux_lora.cli.generate``; examples/generate.py wraps it): call its ``main(argv)``."""
    return importlib.import_module("flux_lora.cli.generate")


def run_python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh process from ``cwd``, this checkout importable, one thread."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
