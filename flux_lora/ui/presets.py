"""The Presets page's view of ``flux_lora.presets`` (the memory model's card-size presets, issue 22's contract):
``preset_for(card_gb, resolution, variant)`` and ``CARD_SIZES_GB``."""

from __future__ import annotations

from typing import Any

from flux_lora import presets as _presets
from flux_lora.presets import CARD_SIZES_GB, VARIANTS, yaml_value

__all__ = ["CARD_SIZES_GB", "VARIANTS", "preset"]


def preset(card_gb: int, resolution: int, variant: str) -> tuple[dict[str, Any], str]:
    """``(overrides for the run, text a person reads)`` of the preset for this card, resolution and model."""
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
        *[f"| `{k}` | `{yaml_value(v)}` |" for k, v in overrides.items()],
        "",
        str(p.notes),
    ]
    return overrides, "\n".join(lines)
