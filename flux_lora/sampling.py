"""Pure flow-matching math shared by training and inference: packing, position ids, schedules, noise.

Conventions: ``t = 1`` is pure noise, ``t = 0`` the clean latent; ``x_t = (1 - t) x0 + t noise``; the model
predicts the velocity ``noise - x0``; Euler steps go from ``t_cur`` to ``t_prev < t_cur``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flux_lora.names import SIDE_MULTIPLE as SIDE_MULTIPLE  # re-exported: configs read them without torch
from flux_lora.names import TimestepSampling as TimestepSampling


def pack(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` latents -> ``[B, (H/2)(W/2), 4C]`` tokens of 2x2 patches (channel = c*4 + ph*2 + pw)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """Inverse of :func:`pack`: ``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]``."""
    b, n, c4 = tokens.shape
    h, w = latent_height // 2, latent_width // 2
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {latent_height}x{latent_width} latent")
    x = tokens.reshape(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def img_ids(
    batch: int,
    latent_height: int,
    latent_width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Position ids ``[B, (h/2)(w/2), 3]`` with ``ids[i, j] = (0, i, j)`` over the packed grid, row-major."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def reference_ids(
    batch: int, latent_height: int, latent_width: int, device: torch.device | str | None = None
) -> Tensor:
    """FLUX.1 Kontext's reference position ids: :func:`img_ids` of the reference's own latent grid (rows and
    columns from 0) with 1 in the first channel (BFL's ``prepare_kontext``, diffusers' ``FluxKontextPipeline``)."""
    ids = img_ids(batch, latent_height, latent_width, device=device).clone()
    ids[..., 0] = 1
    return ids


def txt_ids(
    batch: int, length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Text position ids: zeros ``[B, L, 3]``."""
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)


def latent_size(height: int, width: int, downscale: int = 8) -> tuple[int, int]:
    """Pixel size (rounded down to multiples of ``2*downscale``) -> latent ``(h, w)``."""
    step = 2 * downscale
    if height < step or width < step:
        raise ValueError(f"image size {height}x{width} is smaller than {step}x{step}")
    return 2 * (height // step), 2 * (width // step)


def image_seq_len(latent_height: int, latent_width: int) -> int:
    return (latent_height // 2) * (latent_width // 2)


def resolution_shift(
    seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256, max_seq_len: int = 4096
) -> float:
    """FLUX's ``mu``: linear in the image token count, 0.5 at 256 tokens and 1.15 at 4096 (1024x1024)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return m * seq_len + (base_shift - m * base_seq_len)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """``e^mu / (e^mu + (1/t - 1)^sigma)``; maps 0 -> 0 and 1 -> 1, pushing times toward noise for mu > 0."""
    t = torch.as_tensor(t, dtype=torch.float64)
    out = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return torch.where(t <= 0, torch.zeros_like(t), out)


def get_schedule(
    num_steps: int, seq_len: int, shift: bool = True, base_shift: float = 0.5, max_shift: float = 1.15
) -> list[float]:
    """``num_steps + 1`` times from 1 to 0; shifted by :func:`resolution_shift` for dev, linear for schnell."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        t = time_shift(resolution_shift(seq_len, base_shift, max_shift), 1.0, t)
    return t.tolist()


def sample_timesteps(
    batch: int,
    method: TimestepSampling = "logit_normal",
    *,
    seq_len: int | None = None,
    shift: float | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigmoid_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw one training time per sample, ``[B]`` in (0, 1).

    ``uniform``: U(0, 1). ``logit_normal``: sigmoid(N(mean, std)). ``sigmoid``: sigmoid(scale * N(0, 1)).
    Then, if ``seq_len`` is given, FLUX's resolution-dependent shift (the sampler's ``mu``); else, if ``shift`` is
    given, the fixed shift ``s t / (1 + (s - 1) t)``.
    """
    if method == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif method == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=device))
    elif method == "sigmoid":
        t = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator, device=device))
    else:
        raise ValueError(f"unknown timestep sampling {method!r}; use uniform, logit_normal or sigmoid")
    if seq_len is not None:
        t = time_shift(resolution_shift(seq_len), 1.0, t.double()).float()
    elif shift is not None:
        t = shift * t / (1 + (shift - 1) * t)
    return t.clamp(1e-5, 1 - 1e-5)


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t noise`` with ``t [B]`` broadcast over the other dims."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Velocity target ``noise - x0``."""
    return noise - x0


def euler_step(x: Tensor, velocity: Tensor, t_cur: float, t_prev: float) -> Tensor:
    """One Euler step of the flow ODE from ``t_cur`` to ``t_prev``, in the dtype of ``x``."""
    return x + (t_prev - t_cur) * velocity.to(x.dtype)


def loss_weight(t: Tensor, scheme: str = "none") -> Tensor:
    """Per-sample loss weights ``[B]`` for flow times ``t``: ``none`` (1), ``sigma_sqrt`` (``t^-2``, clamped) or
    ``cosmap`` (``2 / (pi (1 - 2t + 2t^2))``), the SD3 schemes kohya and diffusers offer."""
    if scheme == "none":
        return torch.ones_like(t)
    if scheme == "sigma_sqrt":
        return (t.clamp(min=1e-2) ** -2.0).clamp(max=1e4)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"unknown loss weighting {scheme!r}; use none, sigma_sqrt or cosmap")
