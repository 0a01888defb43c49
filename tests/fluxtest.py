"""Helpers shared by test modules (imported as a plain module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import pytest
import torch

from flux_lora import sampling as S
from flux_lora.model.flux import FluxParams


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


def diffusers_forward(model, x: dict) -> torch.Tensor:
    """Run diffusers' FluxTransformer2DModel on :func:`dit_inputs`."""
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


def diffusers_parts(pipe) -> dict:
    """diffusers' scheduler (FLUX.1-dev's or -schnell's config), VAE and transformer holding the weights of our
    ``FluxPipeline``: the model parts of diffusers' Flux pipelines."""
    diffusers = pytest.importorskip("diffusers")
    from flux_lora.weights.keymaps import (
        ae_to_diffusers,
        ae_to_diffusers_config,
        flux_to_diffusers,
        flux_to_diffusers_config,
    )

    p = pipe.dit.params
    transformer = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(p))
    transformer.load_state_dict(flux_to_diffusers(pipe.dit.state_dict(), p), strict=True)
    vae = diffusers.AutoencoderKL(**ae_to_diffusers_config(pipe.ae.params))
    vae.load_state_dict(ae_to_diffusers(pipe.ae.state_dict(), pipe.ae.params), strict=True)
    dev = p.guidance_embed
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=dev,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0 if dev else 1.0,
    )
    return dict(scheduler=scheduler, vae=vae, transformer=transformer)
