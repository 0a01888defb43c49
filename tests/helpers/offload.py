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


def mark_blocks(model: nn.Module, log: list[tuple], prefix: str = "dit") -> list[RemovableHandle]:
    """Append ``("run", name)`` to ``log`` while each block of ``model`` runs (see :func:`while_each_block_runs`)
    and ``("done", name)`` when it returns (registered before offload's own hooks, so before it sends the block
    back); names as :func:`block_names`. Returns the hook handles."""
    names = block_names(model, prefix)
    blocks = [*model.double_blocks, *model.single_blocks]
    done = [
        b.register_forward_hook(lambda *args, n=n: log.append(("done", n))) for n, b in zip(names, blocks, strict=True)
    ]
    return done + while_each_block_runs(model, lambda i: log.append(("run", names[i])))


def while_each_block_runs(model: nn.Module, record: Callable[[int], None]) -> list[RemovableHandle]:
    """Forward hooks calling ``record(i)`` while block ``i`` of ``model`` (double blocks, then single blocks)
    runs: they sit on a Linear inside each block. Returns the hook handles."""
    inner = [b.img_attn.qkv for b in model.double_blocks] + [b.linear1 for b in model.single_blocks]
    return [m.register_forward_hook(lambda *args, i=i: record(i)) for i, m in enumerate(inner)]


def block_names(model: nn.Module, prefix: str = "dit") -> list[str]:
    """The names :class:`~flux_lora.inference.offload.BlockOffload` gives ``model``'s blocks, in run order."""
    groups = (("double_blocks", len(model.double_blocks)), ("single_blocks", len(model.single_blocks)))
    return [f"{prefix}.{group}.{i}" for group, count in groups for i in range(count)]


def _happens_before(log: list[tuple], a: int, b: int, src: str, dst: str) -> bool:
    """Whether work on stream ``src`` logged at ``a`` is ordered before work on ``dst`` logged at ``b``: an event
    recorded on ``src`` after ``a`` that ``dst`` waits on before ``b`` (streams run in order)."""
    recorded = {e[2]: r for r, e in enumerate(log[a + 1 : b], a + 1) if e[:2] == ("record", src)}
    return any(e[:2] == ("wait", dst) and e[2] in recorded and recorded[e[2]] < w for w, e in enumerate(log[:b]))


def assert_slot_order(log: list[tuple], *sequences: list[str]) -> None:
    """Check a :class:`FakeAccelerator` log, interleaved with ``("load", name)`` moves and ``("run" | "done",
    name)`` marks of a block using its weights, for blocks streamed in ``sequences`` (one per model, sharing the
    slots): the ``k``-th block of a sequence is copied into slot ``k % 2``; its copies are ordered before its runs
    (an event recorded on the copy stream after them, waited on by the compute stream); a copy into a slot is
    ordered after the last use of the slot by the block there before."""
    slot_of = {name: k % 2 for names in sequences for k, name in enumerate(names)}
    copies: list[tuple[int, int]] = []  # (position, slot) since the last load
    loaded: dict[str, int] = {}  # block -> position of its load's last copy
    last_use: dict[int, int] = {}  # slot -> position of the last run/done mark of a block in it
    for pos, entry in enumerate(log):
        if entry[0] == "copy":
            slot = entry[1]
            if slot in last_use:
                assert _happens_before(log, last_use[slot], pos, "compute", "copy"), (pos, entry)
            copies.append((pos, slot))
        elif entry[0] == "load" and entry[1] in slot_of:  # other components' moves are not slot loads
            assert copies and {s for _, s in copies} == {slot_of[entry[1]]}, (entry, copies)
            loaded[entry[1]], copies = copies[-1][0], []
        elif entry[0] in ("run", "done"):
            assert _happens_before(log, loaded[entry[1]], pos, "copy", "compute"), (pos, entry)
            last_use[slot_of[entry[1]]] = pos
