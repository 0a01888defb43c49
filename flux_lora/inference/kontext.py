"""FLUX.1 Kontext's reference image: its latents packed into tokens appended after the noisy image tokens.

The conventions are those of BFL's ``flux`` repository (``sampling.prepare_kontext``) and diffusers'
``FluxKontextPipeline``: the reference's position ids are the image ids of its own latent grid (rows and columns from
0, whatever the output size) with 1 in the first channel; the DiT runs on ``[noisy tokens, reference tokens]`` and
its prediction is sliced back to the noisy tokens; the reference is encoded once (posterior mean) and never
noised. Sizes: by default (``reference_size="preferred"``) the reference is resized to the Kontext training
resolution closest to its aspect ratio, as both reference implementations do (672x1568 ... 1024x1024 ...
1568x672); ``"keep"`` keeps its own size (rounded down to multiples of 16), as diffusers' ``_auto_resize=False``.
"""

from __future__ import annotations

from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from flux_lora.inference.control import ImageInput
from flux_lora.inference.img2img import image_latents
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.sampling import pack, reference_ids

ReferenceSize = Literal["preferred", "keep"]

PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
"""``(width, height)`` pairs Kontext was trained at (BFL's ``PREFERED_KONTEXT_RESOLUTIONS``)."""


def preferred_size(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` of the Kontext resolution whose aspect ratio is closest to ``width / height`` (ties:
    the first in the list, as ``min`` over the tuples in the reference implementations)."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def reference_size(width: int, height: int, mode: ReferenceSize, multiple: int = 16) -> tuple[int, int]:
    """``(width, height)`` the reference is encoded at: see the module docstring."""
    if mode not in ("preferred", "keep"):
        raise ValueError(f"reference_size must be 'preferred' or 'keep', got {mode!r}")
    if mode == "preferred":
        width, height = preferred_size(width, height)
    width, height = width // multiple * multiple, height // multiple * multiple
    if width < multiple or height < multiple:
        raise ValueError(f"the reference image is smaller than {multiple}x{multiple}")
    return width, height


def fit_area(width: int, height: int, area: int, multiple: int = 16) -> tuple[int, int]:
    """``(width, height)`` of about ``area`` pixels at the aspect ratio of ``width x height``, in multiples of
    ``multiple`` (diffusers' Kontext rule for the output size from ``max_area``). Training fits a reference to
    its target's bucket this way."""
    aspect = width / height
    w = round((area * aspect) ** 0.5) // multiple * multiple
    h = round((area / aspect) ** 0.5) // multiple * multiple
    return max(w, multiple), max(h, multiple)


def image_dims(image: ImageInput) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


def reference_tokens(
    image: ImageInput,
    ae: AutoEncoder,
    num_prompts: int,
    batch: int,
    mode: ReferenceSize,
    device: torch.device | str,
) -> tuple[Tensor, Tensor]:
    """``(tokens [batch, M, C] float32, ids [batch, M, 3])`` of one reference or one per prompt (repeated
    prompt-major to ``batch`` rows), encoded by ``ae`` at :func:`reference_size`."""
    first = image[0] if isinstance(image, Tensor) and image.ndim == 4 else image
    width, height = reference_size(*image_dims(first), mode, 2 * ae.params.downscale_factor)
    param = next(ae.parameters())
    x0 = image_latents(image, ae, height, width, num_prompts, device, param.dtype)
    rows = x0.shape[0]
    x0 = x0.expand(batch, *x0.shape[1:]) if rows == 1 else x0.repeat_interleave(batch // rows, 0)
    lh, lw = x0.shape[-2:]
    return pack(x0), reference_ids(batch, lh, lw, device=device)
