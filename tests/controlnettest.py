"""Helpers shared by the ControlNet tests (imported as a plain module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from flux_lora.model.controlnet import ControlNetParams
from flux_lora.model.flux import ControlResiduals

from fluxtest import dit_inputs


def controlnet_inputs(
    p: ControlNetParams, batch: int = 2, lat_h: int = 4, lat_w: int = 6, txt_len: int = 5, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """Random keyword inputs of ``FluxControlNet.forward``: the DiT's, plus a random control input."""
    x = dit_inputs(p.trunk, batch, lat_h, lat_w, txt_len, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x["control"] = torch.randn(batch, lat_h * lat_w // 4, p.control_channels, generator=g)
    return x


def flat(residuals: ControlResiduals) -> torch.Tensor:
    """All residuals side by side, float32: ``[B, N * (double + single), D]``."""
    return torch.cat([r.float() for r in residuals.double + residuals.single], dim=1)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
