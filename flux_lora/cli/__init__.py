"""The command-line programs (installed as ``flux-lora-*`` console scripts); ``train.py`` and
``examples/generate.py`` are thin wrappers around them."""
