"""The one random-LoRA builder of the tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from flux_lora.lora.keys import linear_shapes
from flux_lora.lora.weight import LoraWeight
from flux_lora.model.flux import FluxParams

Shapes = Mapping[str, tuple[int, int]]


def _shapes(target: FluxParams | nn.Module | Shapes, names: Iterable[str] | None) -> Shapes:
    """``{name: (out_features, in_features)}`` for ``names`` (all of a mapping's when ``None``)."""
    if isinstance(target, FluxParams):
        table = linear_shapes(target)
        return {n: table[n] for n in names}
    if isinstance(target, nn.Module):
        layers = {n: target.get_submodule(n) for n in names}
        layers = {n: m.get_base_layer() if hasattr(m, "get_base_layer") else m for n, m in layers.items()}
        return {n: (m.out_features, m.in_features) for n, m in layers.items()}
    return dict(target) if names is None else {n: target[n] for n in names}


def _per_name(value: float | Sequence[float], count: int) -> list:
    return list(value) if isinstance(value, Sequence) else [value] * count


def random_lora(
    target: FluxParams | nn.Module | Shapes,
    names: Iterable[str] | None = None,
    *,
    rank: int | Sequence[int] = 2,
    alpha: float | Sequence[float] = 4.0,
    scale: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoraWeight]:
    """A LoRA with random, non-zero ``down`` and ``up`` (standard normal times ``scale``) on the Linears
    ``names``, in that order. Shapes come from a model's layers (peft-wrapped or not), from ``FluxParams`` (BFL
    module names) or from a ``{name: (out_features, in_features)}`` mapping. ``rank`` and ``alpha`` are one value
    for all or one per name. One generator seeded ``seed`` draws ``down`` then ``up`` for each name in turn."""
    shapes = _shapes(target, names)
    ranks, alphas = _per_name(rank, len(shapes)), _per_name(alpha, len(shapes))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (name, (rows, cols)), r, a in zip(shapes.items(), ranks, alphas, strict=True):
        down = (torch.randn(r, cols, generator=g) * scale).to(dtype)
        up = (torch.randn(rows, r, generator=g) * scale).to(dtype)
        out[name] = LoraWeight(down, up, a)
    return out
