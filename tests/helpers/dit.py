"""Random keyword inputs of the DiT and the ControlNet (BFL argument names), and ControlNet residuals side by
side."""

from __future__ import annotations

import torch

from flux_lora import sampling as S
from flux_lora.model.controlnet import ControlNetParams
from flux_lora.model.flux import ControlResiduals, FluxParams


def dit_inputs(
    p: FluxParams, batch: int = 2, lat_h: int = 6, lat_w: int = 8, txt_len: int = 7, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """Random keyword inputs for ``Flux.forward`` (BFL names)."""
    g = torch.Generator().manual_seed(seed)
    img = S.pack(torch.randn(batch, p.in_channels // 4, lat_h, lat_w, generator=g))
    return dict(
        img=img,
        img_ids=S.img_ids(batch, lat_h, lat_w),
        txt=torch.randn(batch, txt_len, p.context_in_dim, generator=g),
        txt_ids=S.txt_ids(batch, txt_len),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, p.vec_in_dim, generator=g),
        guidance=(torch.rand(batch, generator=g) * 4 + 1) if p.guidance_embed else None,
    )


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
