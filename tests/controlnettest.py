"""Helpers shared by the ControlNet tests (imported as a plain module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from flux_lora import sampling as S
from flux_lora.controlnet import ControlNetParams
from flux_lora.model import ControlResiduals


def controlnet_inputs(p: ControlNetParams, batch: int = 2, lat_h: int = 4, lat_w: int = 6, txt_len: int = 5,
                      seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Random keyword inputs of ``FluxControlNet.forward`` (the control input is random: no autoencoder)."""
    g, t = torch.Generator().manual_seed(seed), p.trunk
    return dict(
        img=S.pack(torch.randn(batch, t.in_channels // 4, lat_h, lat_w, generator=g)),
        img_ids=S.img_ids(batch, lat_h, lat_w),
        txt=torch.randn(batch, txt_len, t.context_in_dim, generator=g),
        txt_ids=S.txt_ids(batch, txt_len),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, t.vec_in_dim, generator=g),
        control=torch.randn(batch, lat_h * lat_w // 4, p.control_channels, generator=g),
        guidance=torch.rand(batch, generator=g) * 4 + 1 if t.guidance_embed else None,
    )


def flat(residuals: ControlResiduals) -> torch.Tensor:
    """All residuals side by side, float32: ``[B, N * (double + single), D]``."""
    return torch.cat([r.float() for r in residuals.double + residuals.single], dim=1)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
