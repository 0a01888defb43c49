"""Small builders shared by the pipeline, offload and adapter tests."""

from __future__ import annotations

import torch
from torch import nn

from flux_lora.lora_formats import LoraWeight
from flux_lora.model import FluxParams


def dit_inputs(params: FluxParams, tokens: int = 6, length: int = 5,
               seed: int = 1) -> dict[str, torch.Tensor | None]:
    """Keyword inputs of one ``Flux.forward`` call, float32, batch 1."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(1, tokens, params.in_channels, generator=g),
        img_ids=torch.rand(1, tokens, 3, generator=g) * 4,
        txt=torch.randn(1, length, params.context_in_dim, generator=g),
        txt_ids=torch.zeros(1, length, 3),
        timesteps=torch.tensor([0.7]),
        y=torch.randn(1, params.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5]) if params.guidance_embed else None,
    )


def random_lora(model: nn.Module, paths: list[str], rank: int = 2, alpha: float = 4.0,
                seed: int = 0) -> dict[str, LoraWeight]:
    """A LoRA on the Linears at ``paths`` with random ``down`` and ``up`` (both non-zero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        layer = model.get_submodule(path)
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        down = torch.randn(rank, layer.in_features, generator=g) * 0.2
        up = torch.randn(layer.out_features, rank, generator=g) * 0.2
        out[path] = LoraWeight(down, up, alpha)
    return out


def realign(module: nn.Module) -> nn.Module:
    """Give every tensor a fresh allocation. Loaded tensors are not 64-byte aligned, and CPU matmuls round
    differently at different alignments, so bit-equality with freshly allocated copies needs this."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                p.data = p.data.clone()
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.clone()
    return module
