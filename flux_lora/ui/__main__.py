"""``flux-lora-ui`` / ``python -m flux_lora.ui``: the local web UI (see :mod:`flux_lora.ui.server`)."""

import sys

from flux_lora.ui.server import main

if __name__ == "__main__":
    sys.exit(main())
