"""Steering generation with ControlNets: what the user gives per ControlNet, its checks, and the residual
provider :func:`flux_lora.inference.pipeline.denoise` calls.

A :class:`ControlNetUnit` is one ControlNet with its control image (and mask, for inpainting ControlNets), a
conditioning scale, the fraction of the steps it acts on, and a mode for union models. The same union
ControlNet may appear in several units with different modes. :func:`check_units` validates a list of units
against the DiT before anything is computed; :func:`control_pixels` resizes a control image to the output
size (so the upscaler and tile modes take the low-resolution image itself); :class:`ControlNetProvider`
holds the encoded control inputs and sums the residuals of the units active at each step.

The step window follows diffusers: step ``i`` of ``N`` is kept when ``start <= i / N`` and
``(i + 1) / N <= end``; a unit outside its window is not run. With true CFG, the negative-prompt call reuses
the residuals of the same step's positive call, as diffusers' pipeline does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from flux_lora.dtypes import float_dtype
from flux_lora.inference.denoise import DiTInputs
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.controlnet import (
    NEEDS_MASK,
    TAKES_NO_MASK,
    FluxControlNet,
    check_compatible,
    combine_residuals,
    encode_control,
    resolve_mode,
)
from flux_lora.model.flux import ControlResiduals, FluxParams

log = logging.getLogger(__name__)

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I")  # 16-bit grayscale PIL modes (depth maps), read as / 65535

ImageInput = Image.Image | Tensor
"""A PIL image, or a tensor ``[3, H, W]`` / ``[B, 3, H, W]`` (masks: ``[H, W]``, ``[1, H, W]``,
``[B, 1, H, W]``) with values in [0, 1]."""


@dataclass(frozen=True, eq=False)
class ControlNetUnit:
    """One ControlNet's part in a generation.

    Attributes:
        controlnet: the model (:func:`flux_lora.weights.controlnet_loading.load_controlnet`).
        image: the control image (edges, depth, pose, ...; for upscaler and tile modes the low-resolution
            image itself), resized to the output size. A batch must have one image per prompt.
        mask: inpainting ControlNets only: white (1) marks the pixels to repaint.
        mode: union ControlNets only: the control type, by name (``canny``, ``depth``, ...) or index.
        scale: the conditioning scale (the residuals are multiplied by it).
        start, end: the fraction of the denoising steps the ControlNet acts on.
    """

    controlnet: FluxControlNet
    image: ImageInput
    mask: ImageInput | None = None
    mode: int | str | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def keep(step: int, num_steps: int, start: float, end: float) -> bool:
    """Whether a ControlNet with window ``[start, end]`` acts on ``step`` of ``num_steps`` (diffusers' rule)."""
    return not (step / num_steps < start or (step + 1) / num_steps > end)


# ------------------------------------------------------------------------------------------ checks


def _check_image(value: object, what: str, channels: int) -> None:
    if isinstance(value, Image.Image):
        if min(value.size) < 1:
            raise ValueError(f"{what} is an empty image ({value.size[0]}x{value.size[1]})")
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a PIL image or a tensor, got {type(value).__name__}")
    shape = tuple(value.shape)
    ok = (value.ndim in (3, 4) and shape[-3] == channels) or (channels == 1 and value.ndim == 2)
    if not ok or min(shape) < 1:
        raise ValueError(
            f"{what} has shape {shape}; expected [{channels}, H, W] or [B, {channels}, H, W] with values in [0, 1]"
        )
    low, high = value.min().item(), value.max().item()
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(f"{what} has values in [{low:.3g}, {high:.3g}]; tensors take values in [0, 1]")


def _check_unit(unit: ControlNetUnit, flux: FluxParams, dtype: torch.dtype, name: str) -> ControlNetUnit:
    """One unit checked, with its mode resolved to an index."""
    cn = unit.controlnet
    if not isinstance(cn, FluxControlNet):
        raise TypeError(f"{name}.controlnet must be a FluxControlNet, got {type(cn).__name__}")
    check_compatible(cn, flux, name)
    if cn.params.is_union and unit.mode is None:
        raise ValueError(
            f"{name}: a union ControlNet ({cn.params.num_modes} modes) needs a mode, by name "
            "(canny, tile, depth, blur, pose, gray, lq) or index"
        )
    try:
        mode = None if unit.mode is None else resolve_mode(unit.mode, cn.params.num_modes)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if unit.image is None:
        raise ValueError(f"{name}: no control image")
    _check_image(unit.image, f"{name}.image", 3)
    if cn.params.is_inpainting and unit.mask is None:
        raise ValueError(f"{name}: {NEEDS_MASK}")
    if unit.mask is not None and not cn.params.is_inpainting:
        raise ValueError(f"{name}: {TAKES_NO_MASK}")
    if unit.mask is not None:
        _check_image(unit.mask, f"{name}.mask", 1)
    if not (0.0 <= unit.start < unit.end <= 1.0):
        raise ValueError(
            f"{name}: the step window must satisfy 0 <= start < end <= 1, got start={unit.start}, end={unit.end}"
        )
    if not math.isfinite(unit.scale):
        raise ValueError(f"{name}: scale must be a finite number, got {unit.scale}")

    cn_dtype = float_dtype(cn)
    if cn_dtype != dtype:
        raise ValueError(
            f"{name}: the ControlNet computes in {cn_dtype}, the pipeline in {dtype}; load it with dtype={dtype}"
        )
    return replace(unit, mode=mode)


def check_units(units: Sequence[ControlNetUnit], flux: FluxParams, dtype: torch.dtype) -> list[ControlNetUnit]:
    """Validate every unit before anything runs; returns them with union modes resolved to indices.

    Raises ``ValueError`` (or ``TypeError``) naming the unit (``controlnets[i]``) for: a ControlNet built for
    another base model, a missing or unknown union mode, a mode for a non-union ControlNet, a missing mask
    for an inpainting ControlNet or a mask for another one, a missing or malformed image, a bad window or
    scale, a compute dtype other than the pipeline's.
    """
    if isinstance(units, ControlNetUnit):
        units = [units]
    return [_check_unit(u, flux, dtype, f"controlnets[{i}]") for i, u in enumerate(units)]


def controlnet_components(units: Sequence[ControlNetUnit]) -> dict[str, FluxControlNet]:
    """The distinct ControlNets of ``units`` (a union model may serve several) as ``controlnet.i`` components
    for :meth:`flux_lora.inference.offload.Placement.joined`."""
    distinct = {id(u.controlnet): u.controlnet for u in units}
    return {f"controlnet.{i}": cn for i, cn in enumerate(distinct.values())}


# ------------------------------------------------------------------------------------------ images


def _to_tensor(value: ImageInput, channels: int) -> Tensor:
    """PIL image or tensor -> float32 ``[B, channels, h, w]`` in [0, 1] (PIL values / 255, or / 65535 for
    16-bit images such as depth maps)."""
    if isinstance(value, Image.Image) and value.mode in WIDE_MODES:
        t = torch.from_numpy(np.asarray(value).astype(np.float32) / 65535.0).clamp(0, 1)
        return t.expand(channels, *t.shape)[None]
    if isinstance(value, Image.Image):
        arr = np.asarray(value.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr)
        return (t.permute(2, 0, 1) if channels == 3 else t[None])[None]
    t = value.detach().float().cpu()
    while t.ndim < 4:
        t = t[None]
    return t


def control_pixels(value: ImageInput, height: int, width: int, *, mask: bool = False) -> Tensor:
    """A control image (or mask) at the output size: ``[B, 3, H, W]`` in [-1, 1] (masks ``[B, 1, H, W]`` in
    [0, 1]).

    PIL images are resized with Lanczos before conversion, as diffusers' image processor does; tensors
    bicubically (antialiased when shrinking). Masks are resized by nearest neighbour. An image whose aspect
    ratio differs from the output's is stretched, with a warning.
    """
    w0, h0 = value.size if isinstance(value, Image.Image) else (value.shape[-1], value.shape[-2])
    if abs(w0 / h0 - width / height) > 0.01 * width / height:
        log.warning("control %s of %dx%d is stretched to %dx%d", "mask" if mask else "image", w0, h0, width, height)
    if isinstance(value, Image.Image) and value.mode in WIDE_MODES:
        value = _to_tensor(value, 1 if mask else 3)
    if isinstance(value, Image.Image) and value.size != (width, height):
        resample = Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS
        value = value.resize((width, height), resample=resample)
    t = _to_tensor(value, 1 if mask else 3)
    if t.shape[-2:] != (height, width):
        if mask:
            t = F.interpolate(t, size=(height, width), mode="nearest")
        else:
            t = F.interpolate(t, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)
    return t if mask else t * 2 - 1


def _batch(t: Tensor, num_prompts: int, what: str) -> int:
    if t.shape[0] not in (1, num_prompts):
        raise ValueError(
            f"{what} is a batch of {t.shape[0]} for {num_prompts} prompts: give one image, or one per prompt"
        )
    return t.shape[0]


def prepare_images(
    units: Sequence[ControlNetUnit], height: int, width: int, num_prompts: int
) -> list[tuple[Tensor, Tensor | None]]:
    """Each unit's ``(image [b, 3, H, W] in [-1, 1], mask [b, 1, H, W] or None)`` at the output size, with
    ``b`` 1 or ``num_prompts`` (image and mask brought to the same ``b``)."""
    out = []
    for i, unit in enumerate(units):
        image = control_pixels(unit.image, height, width)
        b = _batch(image, num_prompts, f"controlnets[{i}].image")
        mask = None
        if unit.mask is not None:
            mask = control_pixels(unit.mask, height, width, mask=True)
            b = max(b, _batch(mask, num_prompts, f"controlnets[{i}].mask"))
            mask = mask.expand(b, *mask.shape[1:])
        out.append((image.expand(b, *image.shape[1:]), mask))
    return out


@dataclass(frozen=True, eq=False)
class EncodedUnit:
    """A unit ready to run: its packed control input ``[B, N, control_channels]``, one row per image."""

    controlnet: FluxControlNet
    control: Tensor
    mode: int | str | None
    scale: float
    start: float
    end: float


@torch.no_grad()
def encode_units(
    units: Sequence[ControlNetUnit],
    images: list[tuple[Tensor, Tensor | None]],
    ae: AutoEncoder,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[EncodedUnit]:
    """Encode each unit's control image (masked and with its mask, for inpainting) with the autoencoder ``ae``
    (the posterior mean) and repeat it to ``batch`` rows: one image for all, or one per prompt repeated for
    each of its images (prompt-major, as the prompts are). ``dtype``: the autoencoder's."""
    encoded = []
    for unit, (image, mask) in zip(units, images, strict=True):
        mask = None if mask is None else mask.to(device)
        control = encode_control(ae, image.to(device, dtype), unit.controlnet.params, mask)
        rows = control.shape[0]
        control = (
            control.expand(batch, *control.shape[1:]) if rows == 1 else control.repeat_interleave(batch // rows, 0)
        )
        encoded.append(EncodedUnit(unit.controlnet, control, unit.mode, unit.scale, unit.start, unit.end))
    return encoded


class ControlNetProvider:
    """The residual provider of :func:`flux_lora.inference.pipeline.denoise` for encoded units.

    At each DiT call it runs the units whose window holds the step and sums their residuals
    (:func:`~flux_lora.model.controlnet.combine_residuals`); a negative-prompt call (true CFG) gets the residuals of
    the same step's positive call. ControlNets that embed guidance get the DiT's guidance, or ``guidance``
    when the DiT has none (a FLUX.1-dev ControlNet on schnell).
    """

    def __init__(self, units: Sequence[EncodedUnit], flux: FluxParams, num_steps: int, guidance: float):
        self.units, self.flux, self.num_steps, self.guidance = list(units), flux, num_steps, guidance
        self._last: tuple[int, ControlResiduals | None] | None = None

    def __call__(self, inputs: DiTInputs) -> ControlResiduals | None:
        if inputs.negative and self._last is not None and self._last[0] == inputs.step:
            return self._last[1]
        parts = [self._run(u, inputs) for u in self.units if keep(inputs.step, self.num_steps, u.start, u.end)]
        residuals = combine_residuals(parts, self.flux)
        if not inputs.negative:
            self._last = (inputs.step, residuals)
        return residuals

    def _run(self, unit: EncodedUnit, x: DiTInputs) -> ControlResiduals:
        g = None
        if unit.controlnet.params.trunk.guidance_embed:
            g = x.guidance
            if g is None:
                g = torch.full((x.img.shape[0],), self.guidance, device=x.img.device, dtype=x.img.dtype)
        return unit.controlnet(
            img=x.img,
            img_ids=x.img_ids,
            txt=x.txt,
            txt_ids=x.txt_ids,
            timesteps=x.timesteps,
            y=x.y,
            control=unit.control.to(x.img.device),
            guidance=g,
            mode=unit.mode,
            scale=unit.scale,
        )
