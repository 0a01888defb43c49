"""Generate images with FLUX.1 and LoRAs: a thin wrapper around :mod:`flux_lora.cli.generate` (installed as the
``flux-lora-generate`` command). ``python examples/generate.py --help`` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, even if another is installed

from flux_lora.cli.generate import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
