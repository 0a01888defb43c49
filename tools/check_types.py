"""Type-check the package with mypy against the per-module baseline in pyproject.toml.

``[tool.flux_lora.type-baseline]`` lists, per module file, how many mypy errors it is allowed today. A module
not listed must have none (and the modules in ``[tool.mypy]``'s strict overrides are checked with the strict
flags). The check fails when a module has more errors than its baseline, and also when it has fewer: then the
baseline must be lowered, so it can only shrink. ``--update`` rewrites the table to the current counts (for a
commit that fixes errors; never to admit new ones).

    python tools/check_types.py
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from mypy import api

if sys.version_info >= (3, 11):
    import tomllib
else:  # mypy depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
TABLE = "[tool.flux_lora.type-baseline]"
ERROR = re.compile(r"^(?P<file>[^:\s]+\.py):\d+: error: ")


def error_counts(report: str) -> Counter[str]:
    return Counter(m["file"] for line in report.splitlines() if (m := ERROR.match(line)))


def baseline() -> dict[str, int]:
    data = tomllib.loads(PYPROJECT.read_text())
    return dict(data.get("tool", {}).get("flux_lora", {}).get("type-baseline", {}))


def compare(counts: Counter[str], allowed: dict[str, int]) -> list[str]:
    problems = []
    for file in sorted(set(counts) | set(allowed)):
        have, limit = counts.get(file, 0), allowed.get(file, 0)
        if have > limit:
            problems.append(f"{file}: {have} mypy errors, the baseline allows {limit}: fix the new ones")
        elif have < limit:
            problems.append(f"{file}: {have} mypy errors, below its baseline {limit}: lower it (--update)")
    return problems


def write_baseline(counts: Counter[str]) -> None:
    text = PYPROJECT.read_text()
    rows = "".join(f'"{f}" = {n}\n' for f, n in sorted(counts.items()))
    block = f"{TABLE}\n# mypy errors allowed per module today; may only shrink (tools/check_types.py)\n{rows}"
    if TABLE in text:
        start = text.index(TABLE)
        end = text.find("\n[", start + len(TABLE))
        text = text[:start] + block + (text[end:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    PYPROJECT.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the baseline to today's counts")
    args = parser.parse_args(argv)
    stdout, stderr, status = api.run(["--config-file", str(PYPROJECT)])
    if status not in (0, 1) or stderr:
        sys.stderr.write(stdout + stderr)
        return 2
    counts = error_counts(stdout)
    if args.update:
        write_baseline(counts)
        print(f"baseline written: {sum(counts.values())} errors in {len(counts)} modules")
        return 0
    allowed = baseline()
    problems = compare(counts, allowed)
    over = {f for f, n in counts.items() if n > allowed.get(f, 0)}
    for line in stdout.splitlines():
        if (m := ERROR.match(line)) and m["file"] in over:
            print(line)
    for line in problems:
        print(line)
    total = sum(counts.values())
    print(
        f"mypy: {total} errors in {len(counts)} modules, {'matching' if not problems else 'NOT matching'} the baseline"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
