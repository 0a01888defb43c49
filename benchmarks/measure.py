"""Device-independent measurements of a training step: bytes held for backward, FLOPs, aten op counts, module
calls. Used by ``bench_cpu.py`` and the tests; nothing here times anything."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


# torch's FLOP counter has formulas for the CUDA attention kernels only; price the CPU flash kernel the same way
# (forward 4 S^2 D, backward 2.5x with the recomputed scores), so CPU counts match what a GPU would run.
def _flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_backward,
}


def _owned_storages(modules: Iterable[nn.Module]) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules for t in list(m.parameters()) + list(m.buffers())}


class _StorageLog(TorchDispatchMode):
    """Remembers (weakly) every storage that an op's output lives in."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                known = self.refs.get(s.data_ptr())
                if known is None or known[0].expired():  # new, or a freed storage's address reused
                    self.refs[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out

    def alive_bytes(self, exclude: set[int]) -> int:
        return sum(n for ptr, (ref, n) in self.refs.items() if ptr not in exclude and not ref.expired())


def held_for_backward(model: nn.Module, forward: Callable[[], Tensor]) -> dict[str, int]:
    """Bytes a training step keeps between forward and backward, two ways, each storage counted once and the
    model's own parameters and buffers excluded:

    * ``saved``: tensors autograd packs for backward (``saved_tensors_hooks``). Activation checkpointing swaps in
      its own hooks inside each checkpointed block, so this misses the block inputs it keeps;
    * ``held``: every storage created during the forward that is still alive when it returns (saved tensors,
      the checkpoint's block inputs, the loss). This is the activation memory the step needs.

    ``forward`` runs the forward and returns the scalar loss; backward then runs so the graph is released.
    """
    owned = _owned_storages([model])
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    log = _StorageLog()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        loss = forward()
    held = log.alive_bytes(owned)
    loss.backward()
    return dict(saved=sum(saved.values()), held=held)


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs torch's counter sees while ``fn`` runs, by op (``total`` included), CPU attention priced as flash."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    by_op = {str(k).split(".")[-1]: int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return {**by_op, "total": int(counter.get_total_flops())}


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.compute = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.compute += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> dict[str, int]:
    """aten ops ``fn`` runs below autograd: ``ops`` all of them, ``kernels`` those that are not views (about the
    kernels an eager GPU run launches)."""
    with _OpCount() as counter:
        fn()
    return dict(ops=counter.ops, kernels=counter.compute)


@contextmanager
def module_calls(modules: Iterable[nn.Module]):
    """Count forward calls of every submodule of ``modules``; yields a one-element list holding the count."""
    count = [0]

    def hook(module, args):
        count[0] += 1

    handles = [m.register_forward_pre_hook(hook) for root in modules for m in root.modules()]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()
