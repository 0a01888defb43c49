"""LoRA and memory-layout helpers shared by the offload and adapter tests."""

from __future__ import annotations

import torch
from torch import nn

from flux_lora.inference.offload import Transfer
from flux_lora.lora.weight import LoraWeight


def random_lora(
    model: nn.Module, paths: list[str], rank: int = 2, alpha: float = 4.0, seed: int = 0
) -> dict[str, LoraWeight]:
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


class FakeAccelerator(Transfer):
    """A distinct placement on the CPU: copies are clones, recognised by their storage. The fake keeps every
    copy alive, so no later tensor can reuse a copy's address and be mistaken for one."""

    def __init__(self) -> None:
        super().__init__("cpu", pin_memory=False)
        self._copies: list[torch.Tensor] = []
        self._addresses: set[int] = set()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        copy = t.clone()
        self._copies.append(copy)
        self._addresses.add(copy.untyped_storage().data_ptr())
        return copy

    def is_on_device(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self._addresses


def while_each_block_runs(model: nn.Module, record) -> list:
    """Forward hooks calling ``record(i)`` while block ``i`` of ``model`` (double blocks, then single blocks)
    runs: they sit on a Linear inside each block. Returns the hook handles."""
    inner = [b.img_attn.qkv for b in model.double_blocks] + [b.linear1 for b in model.single_blocks]
    return [m.register_forward_hook(lambda *args, i=i: record(i)) for i, m in enumerate(inner)]
