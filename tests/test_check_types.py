"""tools/check_types.py: the mypy settings stay strict on the whole package, with no error baseline."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_types", ROOT / "tools" / "check_types.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_project_settings_are_strict_everywhere() -> None:
    assert _tool().config_problems(_pyproject()) == []


@pytest.mark.parametrize(
    ("relax", "named"),
    [
        (lambda t: t["mypy"].update(disallow_any_generics=False), "disallow_any_generics"),
        (lambda t: t["mypy"].pop("disallow_untyped_defs"), "disallow_untyped_defs"),
        (lambda t: t["mypy"].update(files=["flux_lora/model"]), "files"),
        (lambda t: t["mypy"].update(overrides=[{"module": "flux_lora.data.*", "ignore_errors": True}]), "overrides"),
        (lambda t: t.setdefault("flux_lora", {}).update({"type-baseline": {"flux_lora/x.py": 1}}), "baseline"),
    ],
)
def test_a_relaxed_setting_is_named(relax: Any, named: str) -> None:
    pyproject = copy.deepcopy(_pyproject())
    relax(pyproject["tool"])
    problems = _tool().config_problems(pyproject)
    assert len(problems) == 1 and named in problems[0]
