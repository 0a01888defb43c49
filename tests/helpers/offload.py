"""Memory-layout helpers of the offload tests: a fake accelerator on the CPU, re-aligned tensors, hooks that
run while each block runs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from flux_lora.inference.offload import StreamName, Transfer


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
        self.log: list[tuple] = []
        self.buffers: list[int] = []  # storage addresses of the slot buffers, in allocation order
        self.events = 0

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        copy = t.clone()
        self._copies.append(copy)
        self._addresses.add(copy.untyped_storage().data_ptr())
        return copy

    def is_on_device(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self._addresses

    # the stream and event side, recorded in ``log`` in call order (there is one stream on the CPU):
    # ("alloc", slot buffer number, bytes), ("copy", slot buffer number), ("record" | "wait", stream, event number)

    def empty(self, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self._copies.append(buffer)
        self._addresses.add(buffer.untyped_storage().data_ptr())
        self.buffers.append(buffer.untyped_storage().data_ptr())
        self.log.append(("alloc", len(self.buffers) - 1, nbytes))
        return buffer

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.log.append(("copy", self.buffers.index(dst.untyped_storage().data_ptr())))
        super().copy_(dst, src)

    def record(self, stream: StreamName) -> int:
        self.events += 1
        self.log.append(("record", stream, self.events))
        return self.events

    def wait(self, stream: StreamName, event: object) -> None:
        if event is not None:
            self.log.append(("wait", stream, event))


def while_each_block_runs(model: nn.Module, record: Callable[[int], None]) -> list[RemovableHandle]:
    """Forward hooks calling ``record(i)`` while block ``i`` of ``model`` (double blocks, then single blocks)
    runs: they sit on a Linear inside each block. Returns the hook handles."""
    inner = [b.img_attn.qkv for b in model.double_blocks] + [b.linear1 for b in model.single_blocks]
    return [m.register_forward_hook(lambda *args, i=i: record(i)) for i, m in enumerate(inner)]
