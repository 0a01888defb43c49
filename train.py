"""Train a FLUX.1 LoRA: ``python train.py --config configs/<experiment>.yaml [--section.field value ...]``.

A thin wrapper around :mod:`flux_lora.cli.train` (installed as the ``flux-lora-train`` command); ``--help`` lists
every config field.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's package, even if another is installed

from flux_lora.cli.train import main, parser  # noqa: E402

__all__ = ["main", "parser"]

if __name__ == "__main__":
    sys.exit(main())
