"""The FLUX.1 autoencoder (16 latent channels, 8x downscale) with BFL's module names (``ae.safetensors``).

``encode`` returns scaled latents ``scale * (z - shift)``; ``decode`` inverts that. Pixels are in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if self.ch % 32:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm with 32 groups), got {self.ch}")

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoEncoderParams:
        known = set(cls.__dataclass_fields__)
        if set(d) - known:
            raise ValueError(f"unknown AutoEncoderParams keys {sorted(set(d) - known)}; valid: {sorted(known)}")
        return cls(**d)


AE_PRESETS: dict[str, AutoEncoderParams] = {
    "flux": AutoEncoderParams(),
    # Still 8x down (4 levels) so every shape computation in the pipeline is the real one.
    "tiny": replace(AutoEncoderParams(), ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (conv(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *p.ch_mult)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            level_module = nn.Module()
            block_in = p.ch * in_mult[level]
            blocks = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, p.ch * mult))
                block_in = p.ch * mult
            level_module.block = blocks
            level_module.attn = nn.ModuleList()
            if level != len(p.ch_mult) - 1:
                level_module.downsample = Downsample(block_in)
            self.down.append(level_module)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, 2*z, H/8, W/8]`` (mean and log-variance)."""
        h = self.conv_in(x)
        for level in self.down:
            for block in cast(nn.ModuleList, level.block):
                h = block(h)
            if hasattr(level, "downsample"):
                h = cast(nn.Module, level.downsample)(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in)
        levels: list[nn.Module] = []
        for level in reversed(range(len(p.ch_mult))):
            level_module = nn.Module()
            blocks = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, p.ch * p.ch_mult[level]))
                block_in = p.ch * p.ch_mult[level]
            level_module.block = blocks
            level_module.attn = nn.ModuleList()
            if level != 0:
                level_module.upsample = Upsample(block_in)
            levels.insert(0, level_module)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in cast(nn.ModuleList, level.block):
                h = block(h)
            if hasattr(level, "upsample"):
                h = cast(nn.Module, level.upsample)(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """Encoder + decoder with FLUX's latent scale and shift."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, z, H/8, W/8]`` (the mean unless ``sample``)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> pixels ``[B, 3, 8h, 8w]`` (not clamped)."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
