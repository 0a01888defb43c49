"""FLUX.1 ControlNets (InstantX / jasperai / alimama family) under BFL-style module names.

A ControlNet is a short copy of the DiT: the same embedders, ``depth`` double and ``depth_single_blocks``
single blocks, plus ``control_in`` (packed control latents, and for inpainting ControlNets a packed mask, into
the image stream), an optional ``mode_embedder`` (union models: one extra text token naming the control type),
and one output projection per block (``controlnet_blocks``, ``controlnet_single_blocks``, zero at
initialisation by design). Its forward returns :class:`~flux_lora.model.flux.ControlResiduals`, which the DiT adds
after its blocks.

Loading from the diffusers layout lives in ``controlnet_loading.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.flux import ControlResiduals, FluxParams
from flux_lora.model.layers import DoubleStreamBlock, EmbedND, MLPEmbedder, SingleStreamBlock, timestep_embedding
from flux_lora.sampling import pack

# Control types of union ControlNets, by index (InstantX / Shakker-Labs model cards). How many modes a model
# has comes from its config (``num_mode``); these names only spell the indices.
UNION_MODES: dict[str, int] = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
UNION_MODE_ALIASES: dict[str, str] = {"low_quality": "lq", "low-quality": "lq", "grey": "gray"}
# alimama inpainting ControlNets: one mask channel, packed 2x2 like the latents, beside the control latents.
MASK_CHANNELS = 1
PATCH_AREA = 4  # 2x2 latent patches per token (see sampling.pack)
NEEDS_MASK = "this is an inpainting ControlNet (extra input channels in its config): it needs a mask"
TAKES_NO_MASK = "a mask was given, but this ControlNet takes none (no extra input channels in its config)"


@dataclass(frozen=True)
class ControlNetParams:
    """Architecture of a FLUX ControlNet, read from its diffusers ``config.json`` (``controlnet_loading``).

    ``trunk``: the embedders and blocks, which are a DiT's, as :class:`FluxParams` with the ControlNet's own
    block counts (its ``out_channels`` and sampling fields are unused). ``extra_channels``: packed input
    channels beyond the latents (alimama inpainting: 4, one mask channel packed 2x2). ``num_modes``: size of
    the union mode embedding, ``None`` for a single-purpose ControlNet.
    """

    trunk: FluxParams
    extra_channels: int = 0
    num_modes: int | None = None

    def __post_init__(self) -> None:
        if self.trunk.depth + self.trunk.depth_single_blocks == 0:
            raise ValueError("a ControlNet needs blocks: num_layers and num_single_layers are both 0")
        if self.num_modes is not None and self.num_modes < 1:
            raise ValueError(f"num_modes must be >= 1 or None, got {self.num_modes}")
        if self.extra_channels not in (0, MASK_CHANNELS * PATCH_AREA):
            raise ValueError(
                f"extra_channels={self.extra_channels} is not supported: 0, or {MASK_CHANNELS * PATCH_AREA} "
                "(an inpainting mask packed 2x2 beside the latents, as the alimama ControlNets take)"
            )

    @property
    def control_channels(self) -> int:
        """Width of the packed control input: latents plus any packed mask."""
        return self.trunk.in_channels + self.extra_channels

    @property
    def is_union(self) -> bool:
        return self.num_modes is not None

    @property
    def is_inpainting(self) -> bool:
        return self.extra_channels > 0


def resolve_mode(mode: int | str, num_modes: int | None) -> int:
    """A union control mode given by index or name (``canny``, ``tile``, ``depth``, ...) -> its index."""
    if num_modes is None:
        raise ValueError(
            f"control mode {mode!r} given for a ControlNet that is not a union model (no mode embedding in its config)"
        )
    if isinstance(mode, str):
        key = mode.strip().lower()
        key = UNION_MODE_ALIASES.get(key, key)
        if key.isdigit():
            index = int(key)
        elif key in UNION_MODES:
            index = UNION_MODES[key]
        else:
            raise ValueError(
                f"unknown union control mode {mode!r}; choose one of {sorted(UNION_MODES)} "
                f"or an index below {num_modes}"
            )
    else:
        index = int(mode)
    if not 0 <= index < num_modes:
        names = [n for n, i in UNION_MODES.items() if i < num_modes]
        raise ValueError(
            f"union control mode {mode!r} is out of range: this model has {num_modes} modes "
            f"(0..{num_modes - 1}; named: {names})"
        )
    return index


class FluxControlNet(nn.Module):
    """Control latents (+ mask) and the DiT's own inputs in; residuals for the DiT's image stream out."""

    def __init__(self, params: ControlNetParams):
        super().__init__()
        self.params = params
        t, d = params.trunk, params.trunk.hidden_size
        self.pe_embedder = EmbedND(dim=t.head_dim, theta=t.theta, axes_dim=list(t.axes_dim))
        self.img_in = nn.Linear(t.in_channels, d)
        self.control_in = nn.Linear(params.control_channels, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(t.vec_in_dim, d)
        self.guidance_in = MLPEmbedder(256, d) if t.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(t.context_in_dim, d)
        self.mode_embedder = nn.Embedding(params.num_modes, d) if params.num_modes is not None else None
        blocks = (DoubleStreamBlock(d, t.num_heads, t.mlp_ratio, t.qkv_bias) for _ in range(t.depth))
        self.double_blocks = nn.ModuleList(blocks)
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, t.num_heads, t.mlp_ratio) for _ in range(t.depth_single_blocks)
        )
        self.controlnet_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(t.depth))
        self.controlnet_single_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(t.depth_single_blocks))
        self.zero_outputs_()

    @torch.no_grad()
    def zero_outputs_(self) -> None:
        """Zero ``control_in`` and the output projections: a fresh ControlNet leaves the DiT unchanged."""
        for m in [self.control_in, *self.controlnet_blocks, *self.controlnet_single_blocks]:
            if m.weight.device.type != "meta":
                m.weight.zero_()
                m.bias.zero_()

    def _vec(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype)) + self.vector_in(y.to(dtype))
        # A ControlNet without a guidance embedder ignores guidance, as in diffusers' pipeline.
        if self.params.trunk.guidance_embed:
            if guidance is None:
                raise ValueError("this ControlNet embeds guidance (FLUX.1-dev type): pass `guidance`")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec

    def _mode_token(self, mode: int | str | Tensor | None, batch: int, device: torch.device) -> Tensor:
        assert self.params.num_modes is not None and self.mode_embedder is not None  # a union ControlNet's
        if mode is None:
            raise ValueError(
                f"this is a union ControlNet ({self.params.num_modes} modes): pass a control mode, "
                f"one of {sorted(UNION_MODES)} or an index"
            )
        if not isinstance(mode, Tensor):
            mode = torch.full((batch,), resolve_mode(mode, self.params.num_modes), dtype=torch.long)
        mode = mode.to(device=device, dtype=torch.long).reshape(-1).expand(batch)
        if ((mode < 0) | (mode >= self.params.num_modes)).any():
            raise ValueError(f"control modes {mode.tolist()} out of range 0..{self.params.num_modes - 1}")
        return self.mode_embedder(mode)[:, None]

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        control: Tensor,
        guidance: Tensor | None = None,
        mode: int | str | Tensor | None = None,
        scale: float = 1.0,
    ) -> ControlResiduals:
        """Residuals for the DiT, already multiplied by the conditioning ``scale``.

        Args:
            img, img_ids, txt, txt_ids, timesteps, y, guidance: the DiT's inputs at this step (see
                ``Flux.forward``).
            control: ``[B, N, control_channels]`` packed control latents (and mask, for inpainting models).
            mode: union models only: the control mode (name, index, or ``[B]`` indices).
            scale: the conditioning scale.

        Returns:
            ``ControlResiduals`` with ``depth`` double and ``depth_single_blocks`` single ``[B, N, D]``
            tensors.
        """
        if control.shape[:2] != img.shape[:2] or control.shape[-1] != self.params.control_channels:
            p = self.params
            mask = f" + {p.extra_channels} mask channels" if p.extra_channels else ""
            raise ValueError(
                f"control input {tuple(control.shape)} does not fit img {tuple(img.shape)}: "
                f"this ControlNet takes [B, N, {p.control_channels}] ({p.trunk.in_channels} "
                f"latent channels{mask})"
            )
        if mode is not None and not self.params.is_union:
            raise ValueError(f"control mode {mode!r} given, but this ControlNet is not a union model")
        img = self.img_in(img) + self.control_in(control.to(img.dtype))
        dtype = img.dtype  # the compute dtype: conditioning inputs follow it, as in Flux.forward
        vec = self._vec(timesteps, y, guidance, dtype)
        txt = self.txt_in(txt.to(dtype))
        if self.mode_embedder is not None:
            txt = torch.cat((self._mode_token(mode, img.shape[0], img.device).to(txt.dtype), txt), dim=1)
            txt_ids = torch.cat((txt_ids[:, :1], txt_ids), dim=1)  # the mode token sits at text position 0
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        double = []
        for block, proj in zip(self.double_blocks, self.controlnet_blocks, strict=True):
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
            double.append(proj(img) * scale)
        num_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        single = []
        for block, proj in zip(self.single_blocks, self.controlnet_single_blocks, strict=True):
            x = block(x, vec=vec, pe=pe)
            single.append(proj(x[:, num_txt:]) * scale)
        return ControlResiduals(double=double, single=single)


# ------------------------------------------------------------------------------------------ compatibility


def check_compatible(controlnet: FluxControlNet | ControlNetParams, flux: FluxParams, name: str = "ControlNet") -> None:
    """Raise ``ValueError`` naming every mismatch when ``controlnet`` was not built for a DiT with ``flux``
    params.

    Its residuals must have the DiT's width, it reads the same packed latents, T5 and CLIP embeddings and
    position ids, and it cannot have more blocks than the DiT it steers.
    """
    p = (controlnet.params if isinstance(controlnet, FluxControlNet) else controlnet).trunk
    pairs = [
        ("hidden size", p.hidden_size, flux.hidden_size),
        ("attention heads", p.num_heads, flux.num_heads),
        ("RoPE axes", p.axes_dim, flux.axes_dim),
        ("RoPE theta", p.theta, flux.theta),
        ("latent channels (in_channels)", p.in_channels, flux.in_channels),
        ("T5 width (joint_attention_dim)", p.context_in_dim, flux.context_in_dim),
        ("CLIP width (pooled_projection_dim)", p.vec_in_dim, flux.vec_in_dim),
    ]
    problems = [f"{what} {mine} != the DiT's {theirs}" for what, mine, theirs in pairs if mine != theirs]
    if p.depth > flux.depth:
        problems.append(f"{p.depth} double blocks > the DiT's {flux.depth}")
    if p.depth_single_blocks > flux.depth_single_blocks:
        problems.append(f"{p.depth_single_blocks} single blocks > the DiT's {flux.depth_single_blocks}")
    if problems:
        raise ValueError(f"{name} was built for another base model: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ residuals


def _per_block(residuals: list[Tensor], depth: int) -> list[Tensor | None]:
    if not residuals:
        return [None] * depth
    return [residuals[ControlResiduals._index(i, depth, len(residuals))] for i in range(depth)]


def _sum_lists(lists: list[list[Tensor]], depth: int) -> list[Tensor]:
    lists = [r for r in lists if r]
    if not lists:
        return []
    if len({len(r) for r in lists}) == 1:  # same layout: sum entry by entry, as diffusers does
        return [sum(ts[1:], ts[0]) for ts in zip(*lists, strict=True)]
    # Different depths: each keeps its own interval rule, so sum per DiT block (diffusers would truncate to
    # the shortest list instead).
    per_block = [_per_block(r, depth) for r in lists]
    return [sum(ts[1:], ts[0]) for ts in zip(*per_block, strict=True)]


def combine_residuals(parts: list[ControlResiduals], flux: FluxParams) -> ControlResiduals | None:
    """Sum several ControlNets' residuals into one :class:`ControlResiduals` for a DiT of ``flux`` params."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return ControlResiduals(
        double=_sum_lists([p.double for p in parts], flux.depth),
        single=_sum_lists([p.single for p in parts], flux.depth_single_blocks),
    )


# ------------------------------------------------------------------------------------------ control inputs


def mask_to_latent(mask: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """Pixel mask ``[B, 1, H, W]`` (1 = repaint) -> the packed mask an inpainting ControlNet takes.

    The mask is binarised at 0.5, resized to the latent grid by nearest neighbour, inverted (1 = keep, as the
    alimama models were trained), and packed 2x2 like the latents: ``[B, N, MASK_CHANNELS * 4]``.
    """
    if mask.ndim != 4 or mask.shape[1] != MASK_CHANNELS:
        raise ValueError(f"mask must be [B, {MASK_CHANNELS}, H, W], got {tuple(mask.shape)}")
    binary = (mask > 0.5).to(torch.float32)
    small = F.interpolate(binary, size=(latent_height, latent_width), mode="nearest")
    return pack(1.0 - small)


def masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """Image ``[B, 3, H, W]`` in [-1, 1] with the pixels to repaint (``mask > 0.5``) set to -1 (black)."""
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} and image {tuple(image.shape)} differ in size")
    return torch.where(mask > 0.5, torch.full_like(image, -1.0), image)


def control_condition(latents: Tensor, params: ControlNetParams, packed_mask: Tensor | None = None) -> Tensor:
    """Packed control input ``[B, N, control_channels]`` from encoded control latents ``[B, C, h, w]``.

    For an inpainting ControlNet, ``packed_mask`` (from :func:`mask_to_latent`) goes after the latent
    channels; the result equals packing the latents and mask concatenated channel-wise.
    """
    packed = pack(latents)
    if packed.shape[-1] != params.trunk.in_channels:
        raise ValueError(
            f"control latents pack to {packed.shape[-1]} channels, the ControlNet takes {params.trunk.in_channels}"
        )
    if params.is_inpainting:
        if packed_mask is None:
            raise ValueError(NEEDS_MASK)
        if packed_mask.shape[:2] != packed.shape[:2]:
            raise ValueError(f"mask packs to {tuple(packed_mask.shape)}, the latents to {tuple(packed.shape)}")
        return torch.cat((packed, packed_mask.to(packed)), dim=-1)
    if packed_mask is not None:
        raise ValueError(TAKES_NO_MASK)
    return packed


def encode_control(
    ae: AutoEncoder,
    image: Tensor,
    params: ControlNetParams,
    mask: Tensor | None = None,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Control image ``[B, 3, H, W]`` in [-1, 1] (already at the output size) -> packed control input.

    Inpainting ControlNets get the image with the masked pixels blacked out, encoded, and the packed mask
    beside it. ``sample`` draws from the autoencoder's posterior (as diffusers' pipelines do); the default
    takes its mean.
    """
    if params.is_inpainting and mask is None:
        raise ValueError(NEEDS_MASK)
    if mask is not None and not params.is_inpainting:
        raise ValueError(TAKES_NO_MASK)
    if mask is not None:
        image = masked_image(image, mask)
    latents = ae.encode(image, sample=sample, generator=generator)
    packed_mask = None if mask is None else mask_to_latent(mask, *latents.shape[-2:])
    return control_condition(latents, params, packed_mask)
