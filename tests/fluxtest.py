"""Helpers shared by test modules (imported as a plain module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from flux_lora import sampling as S
from flux_lora.model import FluxParams


def dit_inputs(p: FluxParams, batch: int = 2, lat_h: int = 6, lat_w: int = 8, txt_len: int = 7,
               seed: int = 0) -> dict[str, torch.Tensor | None]:
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


def diffusers_forward(model, x: dict) -> torch.Tensor:
    """Run diffusers' FluxTransformer2DModel on :func:`dit_inputs`."""
    return model(
        hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["timesteps"],
        img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"], return_dict=False,
    )[0]
