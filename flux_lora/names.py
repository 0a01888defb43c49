"""Config-level names and constants that need no torch, so reading a config (and ``train.py --help``) stays
light: :mod:`flux_lora.dtypes` and :mod:`flux_lora.sampling` re-export them."""

from __future__ import annotations

from typing import Literal, get_args

Quantize = Literal["float8_e4m3fn"]
"""How the DiT's selected Linears are stored: ``float8_e4m3fn`` (or ``None`` for the checkpoint's float dtype)."""
QUANTIZE_VALUES: tuple[str, ...] = get_args(Quantize)

TimestepSampling = Literal["uniform", "logit_normal", "sigmoid"]

SIDE_MULTIPLE = 16
"""Image sides are multiples of this: the autoencoder's 8x downscale times the DiT's 2x2 patches."""
