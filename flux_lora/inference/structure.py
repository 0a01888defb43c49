"""Structural conditioning for a DiT whose ``img_in`` takes image and structure latents side by side (a BFL
control LoRA applied, as FLUX.1-Canny/Depth-dev-lora): the control image (edges, depth, ...) is encoded by the
autoencoder (posterior mean), packed like the image latents, and concatenated to their channels at every DiT
call, as diffusers' ``FluxControlPipeline`` does."""

from __future__ import annotations

import torch
from torch import Tensor

from flux_lora.inference.control import ImageInput
from flux_lora.inference.img2img import image_latents
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.flux import Flux
from flux_lora.sampling import pack


def structure_channels(dit: Flux) -> int:
    """How many input channels of the DiT's ``img_in`` are beyond the image latents' (0 without a control LoRA)."""
    return dit.img_in.in_features - dit.params.in_channels


def check_structure(dit: Flux, given: bool) -> None:
    """Raise ``ValueError`` when a control image is missing for a widened ``img_in``, or given without one."""
    extra = structure_channels(dit)
    if extra and not given:
        raise ValueError(
            f"the DiT's img_in takes {extra} structure-latent channels beside the image's (a FLUX control LoRA "
            "such as Canny/Depth-dev-lora is applied): pass control_image (--structure-image)"
        )
    if given and extra != dit.params.in_channels:
        raise ValueError(
            f"control_image needs a DiT whose img_in takes image + structure latents ({2 * dit.params.in_channels} "
            f"channels, a FLUX control LoRA applied); this one takes {dit.img_in.in_features}"
        )


def structure_latents(
    image: ImageInput,
    ae: AutoEncoder,
    height: int,
    width: int,
    num_prompts: int,
    batch: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """Packed ``[batch, N, C]`` float32 latents of one control image or one per prompt (repeated prompt-major)."""
    x = image_latents(image, ae, height, width, num_prompts, device, dtype)
    x = x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 else x.repeat_interleave(batch // x.shape[0], 0)
    return pack(x.to(torch.float32))
