"""Memory modes for inference, applied from outside the models.

* model offload: each component (text encoders, DiT, ControlNets, autoencoder) sits on the accelerator only
  while it runs; a call's ControlNets are loaded together with the DiT.
* block offload: the DiT's double and single blocks stay in host memory and stream to the accelerator one at a
  time (forward pre/post hooks on each block); its other parts (embedders, final layer, under 1 % of the
  weights) stay on the accelerator. ControlNets, whose blocks have the same names, stream the same way. On
  CUDA, host copies are pinned (one exact-size buffer per block or component, see :func:`pack_host`) and the
  next block is copied on a side stream while the current one runs; elsewhere the same code runs with
  synchronous copies. Blocks land in two preallocated device buffers (:class:`DeviceSlots`, shared by the DiT
  and a call's ControlNets, held while the DiT is in use), ordered by events, so the CPU running ahead of the
  GPU cannot grow device memory. The text encoders and autoencoder are model-offloaded.

Moving a module swaps each parameter's ``.data`` (and each buffer) between its host tensor, which is kept, and
a device copy, so "moving back" costs no copy, fp8 stays fp8, Parameter objects (and peft wrappers, LoRA
adapters, optimizers holding them) are untouched, and weights changed between runs (a fused LoRA) are what the
next run loads. Do not change weights while a module is on the accelerator: unloading points it back at the
host tensors. Inference only: tensors saved for backward would keep the device copies alive (training's block
swap, :mod:`flux_lora.training.block_swap`, relies on checkpointing for that).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ALIGN = 64
"""Byte alignment of each tensor's slot in a packed host buffer (a cache line; CPU kernels see the alignment a
fresh allocation has)."""
OffloadMode = Literal["model", "block"]
StreamName = Literal["copy", "compute"]
Event = Any
"""A ``torch.cuda.Event`` on CUDA; whatever a test double of :class:`Transfer` records."""
PlacementLog = Callable[[str, str], None]
"""Called with ``("load" | "unload", module name)`` at every move, in order (tests and debugging)."""


class Transfer:
    """Moves tensors between host memory and ``device``; pinned memory and a copy stream on CUDA."""

    def __init__(self, device: str | torch.device, pin_memory: bool | None = None, pack: bool | None = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        # host copies of a module go into one exact-size buffer (pack_host), pinned when pin_memory
        self.pack = self.pin_memory if pack is None else pack
        self._stream: torch.cuda.Stream | None = None

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The side stream that prefetches run on (CUDA only)."""
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def host(self, t: Tensor) -> Tensor:
        """``t`` as a host tensor (moved to the CPU, and pinned when copies are asynchronous)."""
        if t.device.type != "cpu":
            t = t.to("cpu")
        if self.pin_memory and not t.is_pinned():
            t = t.pin_memory()
        return t

    def to_device(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=self.pin_memory)

    def is_on_device(self, t: Tensor) -> bool:
        return t.device == self.device

    def empty(self, nbytes: int) -> Tensor:
        """A flat byte buffer on the device (a :class:`DeviceSlots` slot), allocated on the compute stream."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy_(self, dst: Tensor, src: Tensor) -> None:
        """Copy host tensor ``src`` into device tensor ``dst`` (asynchronous from pinned memory)."""
        dst.copy_(src, non_blocking=self.pin_memory)

    @contextmanager
    def copying(self) -> Iterator[None]:
        """Run the enclosed copies on the copy stream (CUDA); elsewhere on the one stream there is."""
        stream = self.stream
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield

    def record(self, stream: StreamName) -> Event | None:
        """An event recorded now on the ``"copy"`` or ``"compute"`` stream (``None`` without CUDA: one stream,
        everything in order)."""
        if self.device.type != "cuda":
            return None
        return self._cuda_stream(stream).record_event()

    def wait(self, stream: StreamName, event: Event | None) -> None:
        """Make later work on ``stream`` wait for ``event`` (no-op for ``None``)."""
        if event is not None:
            self._cuda_stream(stream).wait_event(cast(torch.cuda.Event, event))

    def _cuda_stream(self, stream: StreamName) -> torch.cuda.Stream:
        if stream == "copy":
            assert self.stream is not None
            return self.stream
        return torch.cuda.current_stream(self.device)

    def memory(self) -> dict[str, float] | None:
        """Device memory now, in GB: allocated by tensors and reserved by the caching allocator (CUDA only;
        ``None`` elsewhere, and nothing is asked of CUDA then)."""
        if self.device.type != "cuda":
            return None
        return dict(
            allocated_GB=torch.cuda.memory_allocated(self.device) / 2**30,
            reserved_GB=torch.cuda.memory_reserved(self.device) / 2**30,
        )


def _slots(module: nn.Module, skip: AbstractSet[int] = frozenset()) -> Iterator[tuple[nn.Module, str, bool]]:
    """``(owner, name, is_parameter)`` for each tensor of ``module`` outside the submodules whose ids are in
    ``skip``; a Parameter shared by several modules (tied weights) comes once."""
    seen: set[int] = set()
    for owner in module.modules():
        if id(owner) in skip:
            continue
        for name, p in owner._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield owner, name, True
        for name, b in owner._buffers.items():
            if b is not None:
                yield owner, name, False


def _unique_tensors(module: nn.Module) -> list[Tensor]:
    """The tensors of ``module``, each storage view once (tied ones share)."""
    unique = {id(t): t for t in (_current(*slot) for slot in _slots(module))}
    return list(unique.values())


def _subtree_ids(modules: list[nn.Module]) -> set[int]:
    return {id(m) for top in modules for m in top.modules()}


def _swap(owner: nn.Module, name: str, is_param: bool, t: Tensor) -> None:
    if is_param:
        cast(nn.Parameter, owner._parameters[name]).data = t
    else:
        owner._buffers[name] = t


def _current(owner: nn.Module, name: str, is_param: bool) -> Tensor:
    return cast(nn.Parameter, owner._parameters[name]).data if is_param else cast(Tensor, owner._buffers[name])


def to_host_(module: nn.Module, transfer: Transfer, skip: AbstractSet[int] = frozenset()) -> None:
    """Make every tensor of ``module`` a host tensor (pinned where ``transfer`` copies asynchronously); with
    ``transfer.pack``, views into one exact-size buffer for the whole module (:func:`pack_host`)."""
    slots = list(_slots(module, skip))
    if not transfer.pack:
        for owner, name, is_param in slots:
            _swap(owner, name, is_param, transfer.host(_current(owner, name, is_param)))
        return
    # keyed by the Parameter or buffer object (``.data`` is a new object at each access): tied buffers pack once
    keys = [id(owner._parameters[name] if is_param else owner._buffers[name]) for owner, name, is_param in slots]
    tensors = {key: _current(*slot) for key, slot in zip(keys, slots, strict=True)}
    packed = dict(zip(tensors, pack_host(list(tensors.values()), transfer.pin_memory), strict=True))
    for key, (owner, name, is_param) in zip(keys, slots, strict=True):
        _swap(owner, name, is_param, packed[key])


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def packed_size(tensors: list[Tensor]) -> int:
    """Bytes of the buffer :func:`pack_host` makes: each tensor's bytes rounded up to ``ALIGN``."""
    return sum(_aligned(t.numel() * t.element_size()) for t in tensors)


def pack_host(tensors: list[Tensor], pin: bool = False) -> list[Tensor]:
    """Copies of ``tensors`` as views into one host buffer of exactly :func:`packed_size` bytes (slots 64-byte
    aligned), in order. ``pin``: the buffer is page-locked with ``cudaHostRegister`` (undone when the buffer is
    freed), not taken from the caching host allocator, which rounds each pinned block up to a power of two (a
    12.0 GB fp8 DiT pinned as one block takes 16.2 GB)."""
    array = np.empty(packed_size(tensors) + ALIGN, dtype=np.uint8)
    start = -array.ctypes.data % ALIGN
    buffer = torch.from_numpy(array)[start : start + packed_size(tensors)]  # the storage keeps ``array`` alive
    if pin and buffer.numel():
        _register(array, buffer.data_ptr(), buffer.numel())
    out, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        view = buffer[offset : offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t.detach())
        out.append(view)
        offset += _aligned(nbytes)
    return out


def _register(owner: np.ndarray, ptr: int, nbytes: int) -> None:
    """Page-lock ``nbytes`` at ``ptr`` for CUDA copies; unregistered when ``owner`` (its memory) is freed."""
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes:,} bytes failed with CUDA error {int(err)}")
    weakref.finalize(owner, cudart.cudaHostUnregister, ptr)


class Loaded:
    """A module whose tensors point at device copies; :meth:`unload` points them back at the host tensors.
    ``place`` makes the device copies of the (deduplicated) host tensors; by default ``transfer.to_device``."""

    def __init__(
        self,
        module: nn.Module,
        transfer: Transfer,
        skip: AbstractSet[int] = frozenset(),
        place: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ):
        self.saved: list[tuple[nn.Module, str, bool, Tensor]] = []
        hosts: dict[int, Tensor] = {}  # id(host tensor) -> host tensor: tied buffers share one copy
        for owner, name, is_param in _slots(module, skip):
            host = _current(owner, name, is_param)
            if transfer.pin_memory and host.device.type == "cpu" and not host.is_pinned():
                host = transfer.host(host)  # re-pin a weight replaced since (e.g. by fusing a LoRA)
            hosts.setdefault(id(host), host)
            self.saved.append((owner, name, is_param, host))
        tensors = list(hosts.values())
        copies = place(tensors) if place is not None else [transfer.to_device(t) for t in tensors]
        on_device = {id(h): c for h, c in zip(tensors, copies, strict=True)}
        for owner, name, is_param, host in self.saved:
            _swap(owner, name, is_param, on_device[id(host)])

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the CUDA allocator the copies are used on ``stream`` (they were allocated on the copy one)."""
        for owner, name, is_param, _ in self.saved:
            _current(owner, name, is_param).record_stream(stream)

    def unload(self) -> None:
        for owner, name, is_param, host in self.saved:
            _swap(owner, name, is_param, host)
        self.saved = []


def location(module: nn.Module, transfer: Transfer) -> str:
    """``"device"``, ``"host"`` or ``"mixed"``: where the tensors of ``module`` are now."""
    flags = {transfer.is_on_device(_current(o, n, p)) for o, n, p in _slots(module)}
    if flags == {True}:
        return "device"
    return "host" if flags <= {False} else "mixed"


class DeviceSlots:
    """Two device buffers that offloaded blocks stream through: block ``k`` of a sequence goes into slot ``k % 2``,
    as views per tensor (64-byte aligned, the layout of :func:`pack_host`) of one flat buffer sized for the
    largest block loaded so far. Before a slot is overwritten, the copy stream waits on an event recorded on the
    compute stream after the work that last used the slot was queued; the compute waits on the event recorded
    after the copy (:meth:`SlotLoaded.wait_ready`). So device memory for streamed blocks is two slots, however far
    the CPU runs ahead. Several streamed models used one after another (a ControlNet, then the DiT) can share one
    pair."""

    def __init__(self, transfer: Transfer):
        self.transfer = transfer
        self.buffers: list[Tensor | None] = [None, None]
        self.freed: list[Event | None] = [None, None]  # recorded after the last use of each slot
        self.users: list[str | None] = [None, None]

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the slots hold now."""
        return sum(b.numel() for b in self.buffers if b is not None)

    def load(self, k: int, name: str, module: nn.Module, skip: AbstractSet[int] = frozenset()) -> SlotLoaded:
        """Copy ``module`` (but the submodules in ``skip``) into slot ``k % 2``, which must be free."""
        slot = k % 2
        if self.users[slot] is not None:
            raise RuntimeError(f"offload slot {slot} still holds {self.users[slot]}; cannot load {name} into it")
        self.users[slot] = name
        ready: list[Event | None] = []

        def place(hosts: list[Tensor]) -> list[Tensor]:
            buffer = self._buffer(slot, packed_size(hosts))
            with self.transfer.copying():
                self.transfer.wait("copy", self.freed[slot])
                views = _views(buffer, hosts)
                for view, host in zip(views, hosts, strict=True):
                    self.transfer.copy_(view, host)
                ready.append(self.transfer.record("copy"))
            return views

        return SlotLoaded(self, slot, Loaded(module, self.transfer, skip, place=place), ready[0])

    def reserve(self, nbytes: int) -> None:
        """Size both slots for a block of ``nbytes`` (packed) now, so no slot grows during a loop."""
        for slot in (0, 1):
            if self.users[slot] is None:
                self._buffer(slot, nbytes)

    def _buffer(self, slot: int, nbytes: int) -> Tensor:
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            self.buffers[slot] = None  # its uses are all queued before the compute stream's next work
            buffer = self.buffers[slot] = self.transfer.empty(max(nbytes, ALIGN))
            self.freed[slot] = self.transfer.record("compute")  # memory the compute stream may have just used
            log.debug("offload slot %d: %.3f GB on %s", slot, buffer.numel() / 2**30, self.transfer.device)
        return buffer

    def done(self, slot: int) -> None:
        """The work using ``slot`` is queued: record the event its next copy waits on."""
        self.freed[slot] = self.transfer.record("compute")
        self.users[slot] = None

    def free(self) -> None:
        """Give the buffers back (between uses of the streamed models); the next load allocates again."""
        if any(u is not None for u in self.users):
            raise RuntimeError(f"offload slots still hold {[u for u in self.users if u]}")
        self.buffers, self.freed = [None, None], [None, None]


def _views(buffer: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """Views of ``buffer`` (bytes) shaped like ``tensors``, one after another in 64-byte aligned slots."""
    out, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        out.append(buffer[offset : offset + nbytes].view(t.dtype).view(t.shape))
        offset += _aligned(nbytes)
    return out


class SlotLoaded:
    """A block loaded into a :class:`DeviceSlots` slot."""

    def __init__(self, slots: DeviceSlots, slot: int, loaded: Loaded, ready: Event | None):
        self.slots, self.slot, self.loaded, self.ready = slots, slot, loaded, ready

    def wait_ready(self) -> None:
        """Make the compute stream wait for the copies (before the block runs)."""
        self.slots.transfer.wait("compute", self.ready)

    def unload(self) -> None:
        """Point the block back at its host tensors; the slot is free once the work queued so far is done."""
        self.wait_ready()  # a prefetch never used: its copies must not outlive the slot's next user
        self.loaded.unload()
        self.slots.done(self.slot)


class BlockOffload:
    """Stream a DiT's ``double_blocks`` and ``single_blocks`` through the accelerator one block at a time.

    Between forwards no block is on the accelerator; during one, the running block and (with ``prefetch``) the
    next one are, in the two buffers of ``slots`` (:class:`DeviceSlots`, shared with other streamed models or
    made here). Works on blocks whose Linears are wrapped by peft or carry run-time LoRAs: whatever tensors a
    block holds when it is called are the ones moved.
    """

    def __init__(
        self,
        model: nn.Module,
        transfer: Transfer,
        *,
        prefetch: bool = True,
        on_move: PlacementLog | None = None,
        name: str = "dit",
        slots: DeviceSlots | None = None,
    ):
        self.transfer = transfer
        self.prefetch = prefetch
        self.on_move = on_move or (lambda action, module: None)
        self.slots = slots or DeviceSlots(transfer)
        self._own_slots = slots is None
        self.name = name
        self.blocks = [
            (f"{name}.{group}.{i}", block)
            for group in ("double_blocks", "single_blocks")
            for i, block in enumerate(getattr(model, group))
        ]
        # so that remove() leaves every tensor in host memory, wherever it started; one buffer per block
        for _, block in self.blocks:
            to_host_(block, transfer)
        to_host_(model, transfer, skip=_subtree_ids([b for _, b in self.blocks]))
        self.rest = Loaded(model, transfer, skip=_subtree_ids([b for _, b in self.blocks]))
        self._pending: dict[int, SlotLoaded] = {}
        self._active: dict[int, SlotLoaded] = {}
        self._reported = False
        self._hooks = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._finish)]
        for i, (_, block) in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self._hooks.append(block.register_forward_hook(self._post_hook(i)))

    def largest(self) -> int:
        """Bytes of the largest block as packed into a slot (its tensors now: LoRAs applied since count)."""
        return max((self.largest_of(block) for _, block in self.blocks), default=0)

    @staticmethod
    def largest_of(block: nn.Module) -> int:
        """Bytes of ``block`` packed into a slot."""
        return packed_size(_unique_tensors(block))

    def _fetch(self, i: int) -> None:
        name, block = self.blocks[i]
        self._pending[i] = self.slots.load(i, name, block)
        self.on_move("load", name)

    def _start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.release()
        self.slots.reserve(self.largest())
        if self.prefetch and self.blocks:
            self._fetch(0)

    def _finish(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.release()
        if not self._reported and log.isEnabledFor(logging.INFO):
            self._reported = True
            memory = self.transfer.memory()
            log.info(
                "block offload of %s: 2 slots, %.3f GB%s",
                self.name,
                self.slots.nbytes / 2**30,
                ""
                if memory is None
                else "; device {allocated_GB:.2f} GB allocated, {reserved_GB:.2f} GB reserved".format(**memory),
            )

    def _pre_hook(self, i: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if i not in self._pending:
                self._fetch(i)
            loaded = self._pending.pop(i)
            loaded.wait_ready()
            self._active[i] = loaded
            following = i + 1
            free = following < len(self.blocks) and self.slots.users[following % 2] is None
            if self.prefetch and free:
                self._fetch(following)

        return hook

    def _post_hook(self, i: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            loaded = self._active.pop(i, None)
            if loaded is not None:
                loaded.unload()
                self.on_move("unload", self.blocks[i][0])

        return hook

    def release(self) -> None:
        """Send back any block still on the accelerator (a prefetch not used, a forward that raised)."""
        for table in (self._active, self._pending):
            for i in list(table):
                table.pop(i).unload()
                self.on_move("unload", self.blocks[i][0])

    def remove(self) -> None:
        """Remove the hooks; every tensor of the model ends in host memory (and slots made here are freed)."""
        self.release()
        for h in self._hooks:
            h.remove()
        self.rest.unload()
        if self._own_slots:
            self.slots.free()


class Placement:
    """Where a pipeline's components live, and when they move.

    ``mode=None``: every component is moved to the device once. ``"model"``: components stay in host memory
    and :meth:`use` puts them on the device for the duration of a ``with`` block. ``"block"``: as ``"model"``
    for every component but ``dit``, whose blocks stream through :class:`BlockOffload` while its other parts
    stay on the device. Components that take part in one call only (ControlNets) join with :meth:`joined`.
    """

    def __init__(
        self,
        components: dict[str, nn.Module],
        transfer: Transfer,
        mode: OffloadMode | None = None,
        *,
        dit: str = "dit",
        on_move: PlacementLog | None = None,
    ):
        if mode not in (None, "model", "block"):
            raise ValueError(f"offload must be None, 'model' or 'block', got {mode!r}")
        self.components, self.transfer, self.mode = dict(components), transfer, mode
        self.on_move = on_move or (lambda action, module: None)
        self.streams: dict[str, BlockOffload] = {}  # components whose blocks stream ("block" mode)
        self.slots = DeviceSlots(transfer)  # the two device buffers every streamed component's blocks go through
        for name, module in components.items():
            self._place(name, module, stream=name == dit)
        if mode is not None:
            log.info("offload %r: components in host memory, on %s only while they run", mode, transfer.device)

    @property
    def blocks(self) -> BlockOffload | None:
        """The DiT's block streaming in ``"block"`` mode (the first streamed component)."""
        return next(iter(self.streams.values()), None)

    def _place(self, name: str, module: nn.Module, stream: bool) -> None:
        if self.mode is None:
            module.to(self.transfer.device)
        elif self.mode == "block" and stream:
            self.streams[name] = BlockOffload(module, self.transfer, on_move=self.on_move, name=name, slots=self.slots)
        else:
            to_host_(module, self.transfer)

    @contextmanager
    def joined(self, extra: Mapping[str, nn.Module]) -> Iterator[None]:
        """Components that take part inside the ``with`` block only (a call's ControlNets), placed as the
        mode says; in ``"block"`` mode their ``double_blocks`` and ``single_blocks`` stream like the DiT's.
        Afterwards they are no longer components (in host memory, unless ``mode`` is ``None``)."""
        clash = sorted(set(extra) & set(self.components))
        if clash:
            raise ValueError(f"components {clash} are already placed")
        try:
            for name, module in extra.items():
                self.components[name] = module
                self._place(name, module, stream=hasattr(module, "double_blocks"))
            yield
        finally:
            for name in extra:
                stream = self.streams.pop(name, None)
                if stream is not None:
                    stream.remove()
                self.components.pop(name, None)

    @contextmanager
    def use(self, *names: str) -> Iterator[None]:
        """Have the components ``names`` on the device inside the ``with`` block (unloaded in reverse)."""
        with ExitStack() as stack:
            for name in names:
                stack.enter_context(self._use(name))
            yield

    @contextmanager
    def _use(self, name: str) -> Iterator[None]:
        module = self.components[name]
        if self.mode is None:
            yield
            return
        if name in self.streams:
            self.slots.reserve(max(stream.largest() for stream in self.streams.values()))
            try:
                yield
            finally:
                for stream in self.streams.values():  # any streamed block left by a failure, whose ever it is
                    stream.release()
                self.slots.free()  # the slots live while a streamed component is in use, not in between
            return
        loaded = Loaded(module, self.transfer)
        self.on_move("load", name)
        try:
            yield
        finally:
            loaded.unload()
            self.on_move("unload", name)

    def remove(self) -> None:
        """Undo the mode's hooks; offloaded components end in host memory."""
        for stream in self.streams.values():
            stream.remove()
        self.streams = {}
        self.slots.free()
