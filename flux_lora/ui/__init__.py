"""The local web UI (``flux-lora-ui``): a thin layer over the command line. It writes the same YAML configs, runs
the same ``train.py`` as a child process and reads the same output folders, so anything done in it can be repeated
from the command line. Gradio is imported only by :mod:`flux_lora.ui.app`; nothing here imports torch.
"""

import os

# No usage reports and no version check from Gradio: the UI talks to nobody but its own browser.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
