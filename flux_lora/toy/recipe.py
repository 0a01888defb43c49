"""The toy model's shape and training recipe: one frozen dataclass, recorded in the model folder it makes.

The toy DiT is FLUX.1-dev's structure (double and single blocks, 3-axis RoPE, QK norm, modulation, guidance input,
64-channel packed latents) at a width that trains from scratch on two CPU cores in minutes; its autoencoder is the
FLUX autoencoder (16 latent channels, 8x down) with the fewest layers the structure allows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from flux_lora.model.autoencoder import AE_PRESETS, AutoEncoderParams
from flux_lora.model.flux import FluxParams

TOY_DIT = FluxParams(
    vec_in_dim=32,
    context_in_dim=64,
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 12, 12),
    max_sequence_length=24,
    default_steps=20,
)
TOY_AE = replace(AE_PRESETS["tiny"], num_res_blocks=0, scale_factor=1.0, shift_factor=0.0)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the toy model's weights (with the code): change one and the weights change."""

    seed: int = 0
    image_size: int = 64
    scenes: int = 4000  # rendered once; the autoencoder also sees stars (the DiT never does)
    ae_channels: int = 64  # GroupNorm's 32 groups need >1 channel each, or flat colours are normalised away
    ae_steps: int = 1500
    ae_batch: int = 32
    ae_crop: int = 32  # the autoencoder trains on random crops this size (it is convolutional): 4x cheaper ...
    ae_full_steps: int = 300  # ... but for its last steps, on whole images (the same pixels per batch): GroupNorm
    # and the attention see a whole scene's statistics, not a crop's (crop-only training rounds squares at 64 px)
    ae_lr: float = 4e-3
    ae_shape_weight: float = 2.0  # extra loss weight where a pixel differs from the background: edges, colours
    ae_latent_noise: float = 0.1  # added to the latents while training it: a decoder that forgives the DiT
    dit_steps: int = 1800
    dit_batch: int = 64
    dit_lr: float = 1e-3
    dit_warmup: int = 100
    caption_dropout: float = 0.1  # the empty caption then means "any scene": true CFG works on the toy model
    threads: int = 2  # pinned: float sums depend on how a matmul is split between threads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def toy_autoencoder_params(recipe: Recipe, shift: float = 0.0, scale: float = 1.0) -> AutoEncoderParams:
    """The toy autoencoder's parameters, with its measured latent ``shift`` and ``scale`` factors."""
    return replace(TOY_AE, ch=recipe.ae_channels, shift_factor=round(shift, 6), scale_factor=round(scale, 6))
