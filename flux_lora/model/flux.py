"""The FLUX.1 DiT (``Flux``) and its hyper-parameters, with BFL's module names.

Official ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` files load into :class:`Flux` with strict key
matching. Quantization, LoRA, checkpointing and offload are applied from outside (``model/fp8.py``,
``lora/peft_adapters.py``, ``training/block_wrappers.py``, ``inference/offload.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from flux_lora.model.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass(frozen=True)
class FluxParams:
    """Architecture of a FLUX.1 DiT. ``hidden_size / num_heads`` must equal ``sum(axes_dim)``."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    # Text-side facts that travel with the model: T5 tokens the model was distilled with, and the
    # sampling defaults (schnell is timestep-distilled for 4 unshifted steps).
    max_sequence_length: int = 512
    default_steps: int = 28
    shift_schedule: bool = True
    # FLUX.1 Kontext [dev]: the same DiT, run with a reference image's tokens appended after the noisy ones
    # (position ids with 1 in the first channel) and distilled for guidance 2.5.
    kontext: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal the head size {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def default_guidance(self) -> float:
        """The embedded guidance the model is meant to run with: 2.5 for Kontext (BFL's and diffusers' default),
        3.5 for dev."""
        return 2.5 if self.kontext else 3.5

    @property
    def variant(self) -> str:
        """``kontext``, ``dev`` or ``schnell``."""
        return "kontext" if self.kontext else "dev" if self.guidance_embed else "schnell"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        if not self.kontext:  # files of dev and schnell models stay as older versions wrote (and read) them
            del d["kontext"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FluxParams:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FluxParams keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)


FLUX_DEV = FluxParams()
PRESETS: dict[str, FluxParams] = {
    "flux-dev": FLUX_DEV,
    "flux-schnell": replace(
        FLUX_DEV, guidance_embed=False, max_sequence_length=256, default_steps=4, shift_schedule=False
    ),
    # The real structure (double + single blocks, 3-axis RoPE, QK norm, modulation, guidance) at a size that runs in
    # milliseconds on a CPU. in_channels stays 64 so latent packing is exercised exactly as in production, and
    # mlp_ratio stays 4 so diffusers' FluxTransformer2DModel can hold the same weights.
    "tiny": FluxParams(
        vec_in_dim=32,
        context_in_dim=32,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(8, 12, 12),
        max_sequence_length=32,
        default_steps=4,
    ),
}
PRESETS["tiny-schnell"] = replace(PRESETS["tiny"], guidance_embed=False, shift_schedule=False)
PRESETS["flux-kontext-dev"] = replace(FLUX_DEV, kontext=True)
PRESETS["tiny-kontext"] = replace(PRESETS["tiny"], kontext=True)


class Flux(nn.Module):
    """Flow-matching transformer: packed latents and text embeddings in, velocity out."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(256, params.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        controls: ControlResiduals | None = None,
    ) -> Tensor:
        """Predict the flow velocity ``noise - x0``.

        Args:
            img: ``[B, N, in_channels]`` packed latents.
            img_ids: ``[B, N, 3]`` image position ids.
            txt: ``[B, L, context_in_dim]`` T5 hidden states.
            txt_ids: ``[B, L, 3]`` text position ids (zeros).
            timesteps: ``[B]`` flow times in [0, 1] (1 = pure noise).
            y: ``[B, vec_in_dim]`` CLIP pooled embedding.
            guidance: ``[B]`` embedded guidance strength (dev only).
            controls: ControlNet residuals added to the image stream after each block.

        Returns:
            ``[B, N, out_channels]`` velocity.
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, S, C], got {tuple(img.shape)} and {tuple(txt.shape)}")
        img = self.img_in(img)
        dtype = img.dtype  # the compute dtype: conditioning inputs follow it
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (dev): pass `guidance`")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for i, block in enumerate(self.double_blocks):
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
            if controls is not None:
                img = controls.add_double(i, len(self.double_blocks), img)
        num_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = block(x, vec=vec, pe=pe)
            if controls is not None:
                x = torch.cat((x[:, :num_txt], controls.add_single(i, len(self.single_blocks), x[:, num_txt:])), dim=1)
        return self.final_layer(x[:, num_txt:], vec)


@dataclass
class ControlResiduals:
    """Residuals from one or more ControlNets, summed, to add to the DiT's image tokens.

    ``double[j]`` is added after double block ``i`` with ``j = i // ceil(depth / len(double))`` (the layout of
    InstantX / jasperai / alimama ControlNets); the same rule holds for ``single``. Each tensor is ``[B, N, D]``.
    """

    double: list[Tensor] = field(default_factory=list)
    single: list[Tensor] = field(default_factory=list)

    @staticmethod
    def _index(i: int, depth: int, count: int) -> int:
        interval = -(-depth // count)
        return i // interval

    def add_double(self, i: int, depth: int, img: Tensor) -> Tensor:
        if not self.double:
            return img
        return img + self.double[self._index(i, depth, len(self.double))].to(img.dtype)

    def add_single(self, i: int, depth: int, img: Tensor) -> Tensor:
        if not self.single:
            return img
        return img + self.single[self._index(i, depth, len(self.single))].to(img.dtype)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(number of parameters, number of tensors)`` of a model's state dict (meta tensors work)."""
    sd = model.state_dict()
    return sum(t.numel() for t in sd.values()), len(sd)
