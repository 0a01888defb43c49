"""What BFL control LoRAs replace rather than add to: RMSNorm scales (``NormOverride``) and the width of
``img_in``, whose input grows to image + structure latents (64 -> 128 channels for FLUX.1).

Widening gives the layer zero columns for the new inputs, so the base model ignores the structure latents and
only the LoRA reads them (as diffusers' ``_maybe_expand_transformer_param_shape_or_error_`` does). An fp8
layer is widened in its stored bytes (fp8 zero, per-row scales unchanged), so nothing is re-quantized. Each
replacement keeps the original tensor, and restoring puts that very tensor back: bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Replaced:
    """A tensor that was swapped out (``module.<attr>.data``), and the layer's ``in_features`` if it changed."""

    module: nn.Module
    attr: str
    original: Tensor
    in_features: int | None = None


def override(module: nn.Module, attr: str, value: Tensor) -> Replaced:
    """``module.<attr>`` (a parameter) takes ``value`` in its own dtype and device."""
    param = getattr(module, attr)
    saved = Replaced(module, attr, param.data)
    param.data = value.detach().to(param.device, param.dtype).clone()
    return saved


def widen(layer: nn.Linear, width: int) -> Replaced:
    """Give ``layer`` ``width`` input columns, the new ones zero (``width`` > its ``in_features``)."""
    weight = layer.weight.data
    saved = Replaced(layer, "weight", weight, layer.in_features)
    store = weight.view(torch.uint8) if weight.dtype.itemsize == 1 else weight  # fp8: pad the bytes with zeros
    wide = store.new_zeros((store.shape[0], width))
    wide[:, : store.shape[1]] = store
    layer.weight.data = wide.view(weight.dtype) if weight.dtype.itemsize == 1 else wide
    layer.in_features = width
    return saved


def restore(saved: Replaced) -> None:
    """Put the original tensor (and width) back."""
    param = getattr(saved.module, saved.attr)
    param.data = saved.original.to(param.device)  # the same tensor unless offloading moved the layer
    if saved.in_features is not None:
        saved.module.in_features = saved.in_features  # type: ignore[assignment]
