"""The test bench's child process: ``python -m flux_lora.ui.bench_worker grid.json`` runs ``generate.py`` once per
cell of the grid (``{"jobs": [[arg, ...], ...]}``), in this one process so torch is imported once. The first cell
that fails ends it with ``generate.py``'s own one-line error and status 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flux_lora.cli import generate


def main(argv: list[str] | None = None) -> int:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    for job in spec["jobs"]:
        code = generate.cli(job)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
