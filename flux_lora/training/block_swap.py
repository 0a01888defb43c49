"""Block swap for small cards: the last N blocks of the DiT live in (pinned) host memory and each is copied to the GPU
just before it runs, in the forward and again when gradient checkpointing recomputes it in backward.

The hooks sit on the blocks inside the checkpoint wrappers, so they fire for the forward and for the recomputation.
A recomputation stops as soon as it has what backward needs (non-reentrant checkpointing's early stop), so no hook
runs after it: the next block's load sends back the one before, and :meth:`BlockSwap.release` sends back the last
after the step. The copies go through a fixed pair of device buffers
(:class:`~flux_lora.inference.offload.DeviceSlots`): swapped block ``k`` uses slot ``k % 2``, and a copy into a slot
is ordered after the work that last used it, so the device memory of swapped blocks is two slots however far the CPU
runs ahead. The weights a block's backward needs are views of its slot, saved by autograd during the recomputation;
the slot is next overwritten by the recomputation two blocks earlier, which starts after that backward. Trainable
adapters (peft's LoRA layers) never move. With gradient checkpointing off, autograd would keep every block's weights
until backward while the slots are reused, so block swap requires it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from flux_lora.inference.offload import DeviceSlots, SlotLoaded, Transfer, to_host_
from flux_lora.model.layers import WRAPPED

Log = Callable[[str, str], None]


def trainable_ids(module: nn.Module) -> set[int]:
    """Ids of the submodules that hold a trainable parameter (they stay where they are)."""
    return {id(m) for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}


def swap_order(dit: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks in the order they run, by BFL name, unwrapped from any checkpoint wrapper."""
    return [
        (f"{group}.{i}", getattr(block, WRAPPED, block))
        for group in ("double_blocks", "single_blocks")
        for i, block in enumerate(getattr(dit, group))
    ]


class BlockSwap:
    """Keep the last ``count`` blocks of ``dit`` in host memory; stream each to ``transfer.device`` while it runs."""

    def __init__(self, dit: nn.Module, transfer: Transfer, count: int, on_move: Log | None = None):
        blocks = swap_order(dit)
        if not 0 < count <= len(blocks):
            raise ValueError(f"model.blocks_to_swap must be between 1 and {len(blocks)}, got {count}")
        self.transfer = transfer
        self.on_move: Log = on_move or (lambda action, name: None)
        self.swapped = blocks[-count:]
        self.slots = DeviceSlots(transfer)
        self._loaded: dict[str, SlotLoaded] = {}
        self._hooks: list[RemovableHandle] = []
        for k, (name, block) in enumerate(self.swapped):
            keep = trainable_ids(block)
            to_host_(block, transfer, skip=keep)
            self._hooks.append(block.register_forward_pre_hook(self._load(k, name, block, keep)))
            self._hooks.append(block.register_forward_hook(self._unload(name)))

    def _load(self, k: int, name: str, block: nn.Module, keep: set[int]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.release(keep=name)
            if name not in self._loaded:
                self._loaded[name] = self.slots.load(k, name, block, skip=keep)
                self.on_move("load", name)
            self._loaded[name].wait_ready()

        return hook

    def _unload(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            loaded = self._loaded.pop(name, None)
            if loaded is not None:
                loaded.unload()
                self.on_move("unload", name)

        return hook

    def release(self, keep: str | None = None) -> None:
        """Send every loaded swapped block but ``keep`` back to host memory."""
        for name in [n for n in self._loaded if n != keep]:
            self._loaded.pop(name).unload()
            self.on_move("unload", name)

    def remove(self) -> None:
        """Remove the hooks (the swapped blocks stay in host memory) and free the slots."""
        self.release()
        for h in self._hooks:
            h.remove()
        self.slots.free()
