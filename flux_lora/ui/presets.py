"""The Presets page's view of ``flux_lora.presets`` (the memory model's card-size presets, issue 22's contract):
``preset_for(card_gb, resolution, variant)`` and ``CARD_SIZES_GB``."""

from __future__ import annotations

import importlib
from typing import Any

try:
    _presets: Any = importlib.import_module("flux_lora.presets")
    CARD_SIZES_GB: tuple[int, ...] = tuple(_presets.CARD_SIZES_GB)
except ImportError:  # a package without the presets module
    _presets = None
    CARD_SIZES_GB = (12, 16, 24, 48, 80)

VARIANTS = ("flux-dev", "flux-schnell")


def available() -> bool:
    return _presets is not None


def preset(card_gb: int, resolution: int, variant: str) -> tuple[dict[str, Any], str]:
    """``(overrides for the run, text a person reads)`` of the preset for this card, resolution and model."""
    if _presets is None:
        raise ValueError("flux_lora.presets is not in this installation: presets are not available")
    p = _presets.preset_for(int(card_gb), int(resolution), variant)
    overrides = {**dict(p.overrides), "data.resolution": int(resolution)}
    lines = [
        f"### {variant}, {card_gb} GB card, {resolution} px",
        f"**Estimated peak memory: {p.peak_gb:.1f} GB** (the memory model's estimate, not a measurement) — "
        + (
            "fits this card." if p.fits else "**does not fit this card**: choose a smaller resolution or a larger card."
        ),
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| `{k}` | `{v}` |" for k, v in overrides.items()],
        "",
        str(p.notes),
    ]
    return overrides, "\n".join(lines)
