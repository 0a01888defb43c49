"""Type-check the package with mypy, strict on every module, no error allowed.

The settings are ``[tool.mypy]`` in pyproject.toml: the whole ``flux_lora`` package with
``disallow_untyped_defs``, ``disallow_incomplete_defs`` and ``disallow_any_generics`` (warn_return_any stays
off: calling an nn.Module returns Any in torch's stubs). This runs plain ``mypy`` with them, after checking that
they are still there: no strict flag turned off, no per-module override and no error baseline. Extra arguments go
to mypy.

    python tools/check_types.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mypy import api

if sys.version_info >= (3, 11):
    import tomllib
else:  # mypy depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
STRICT = ("disallow_untyped_defs", "disallow_incomplete_defs", "disallow_any_generics", "check_untyped_defs")


def config_problems(pyproject: dict[str, Any]) -> list[str]:
    """Why the ``[tool.mypy]`` settings no longer check the whole package strictly (empty when they do)."""
    mypy = pyproject.get("tool", {}).get("mypy", {})
    problems = [f"[tool.mypy] {flag} must be true" for flag in STRICT if mypy.get(flag) is not True]
    if mypy.get("files") != ["flux_lora"]:
        problems.append(f'[tool.mypy] files must be ["flux_lora"], not {mypy.get("files")!r}')
    if mypy.get("overrides"):
        problems.append("[[tool.mypy.overrides]]: every module is checked with the same strict flags")
    if "type-baseline" in pyproject.get("tool", {}).get("flux_lora", {}):
        problems.append("[tool.flux_lora.type-baseline]: no mypy error is allowed, so there is no baseline")
    return problems


def main(argv: list[str] | None = None) -> int:
    problems = config_problems(tomllib.loads(PYPROJECT.read_text()))
    for line in problems:
        print(f"{PYPROJECT.name}: {line}")
    os.chdir(ROOT)  # the configured paths are relative to the repository root
    stdout, stderr, status = api.run(["--config-file", str(PYPROJECT), *(sys.argv[1:] if argv is None else argv)])
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    return status or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
