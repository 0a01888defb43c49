"""Image to image: start the flow from the input image's latents, noised to the time where the schedule is cut.

``strength`` in [0, 1] keeps the last ``steps - int(steps - steps * strength)`` steps of the text-to-image
schedule (diffusers' rule: 3 of 4 steps at 0.6) and starts from ``x_t = (1 - t) x0 + t noise`` at their first
time ``t``. Strength 1 starts from the noise itself (the text-to-image result for the same noise); strength 0
runs no step and returns the input image's latents (its autoencoder round trip once decoded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flux_lora.inference.control import ImageInput, control_pixels
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.sampling import add_noise


def cut_schedule(schedule: list[float], strength: float) -> list[float]:
    """The tail of a ``steps + 1`` times schedule that an image-to-image run of ``strength`` integrates."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    steps = len(schedule) - 1
    start = int(max(steps - min(steps * strength, steps), 0))
    return schedule[start:]


def image_latents(
    image: ImageInput,
    ae: AutoEncoder,
    height: int,
    width: int,
    num_prompts: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """``[b, C, h, w]`` float32 latents (posterior mean) of one image or one per prompt, at the output size."""
    pixels = control_pixels(image, height, width)
    if pixels.shape[0] not in (1, num_prompts):
        raise ValueError(
            f"image is a batch of {pixels.shape[0]} for {num_prompts} prompts: give one image, or one per prompt"
        )
    with torch.no_grad():
        return ae.encode(pixels.to(device, dtype)).float()


def noised_start(x0: Tensor, noise: Tensor, t: float) -> Tensor:
    """``(1 - t) x0 + t noise`` with ``x0`` ``[1 or num_prompts, C, h, w]`` repeated prompt-major to ``noise``."""
    batch, rows = noise.shape[0], x0.shape[0]
    x0 = (
        x0.to(noise.device).expand(batch, *x0.shape[1:])
        if rows == 1
        else x0.to(noise.device).repeat_interleave(batch // rows, 0)
    )
    return add_noise(x0, noise, torch.full((batch,), float(t), dtype=noise.dtype, device=noise.device))
