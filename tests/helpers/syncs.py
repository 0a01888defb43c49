"""Host syncs of a training run, counted on the CPU: every ``item()``, ``bool()``, ``float()`` or print of a
tensor goes through ``aten._local_scalar_dense``, which on a GPU waits for every queued kernel to finish."""

from __future__ import annotations

import linecache
import sys
from collections import Counter

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# host work that never touches the training device: reading cached tensors (before Lightning moves the batch)
HOST_ONLY = ("torch/utils/data/", "flux_lora/data/")


# peft's LoHa / LoKr layers draw their module dropout as ``torch.rand(1) > module_dropout``: a tensor made on the
# host (no device argument), whose read never waits for an accelerator
HOST_DRAW = ("peft/tuners/loha/layer.py", "peft/tuners/lokr/layer.py")


def _in_host_only_code() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if any(part in path for part in HOST_ONLY):
            return True
        if path.endswith(HOST_DRAW) and "torch.rand(1) > module_dropout" in linecache.getline(path, frame.f_lineno):
            return True
        frame = frame.f_back
    return False


class _Count(TorchDispatchMode):
    def __init__(self, owner: SyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.owner.record(args[0])
        return func(*args, **(kwargs or {}))


class SyncCounter(L.Callback):
    """Counts the scalar reads of a fit by optimizer step (``per_step[s]``: from fetching step ``s``'s first
    batch to fetching the next step's, Lightning's logging after the step included). Not counted: reads in the
    data loading code and of the optimizers' ``step`` counters, which torch keeps on the host (non-capturable,
    non-fused optimizers) precisely so that reading them does not sync."""

    def __init__(self) -> None:
        self.per_step: Counter[int] = Counter()
        self._trainer: L.Trainer | None = None
        self._mode: _Count | None = None

    def record(self, tensor: torch.Tensor) -> None:
        trainer = self._trainer
        if trainer is None or _in_host_only_code() or self._optimizer_counter(trainer, tensor):
            return
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        self.per_step[(batches - 1) // trainer.accumulate_grad_batches + 1] += 1

    @staticmethod
    def _optimizer_counter(trainer: L.Trainer, tensor: torch.Tensor) -> bool:
        states = (s for opt in trainer.optimizers for s in opt.state.values())
        return any(s.get("step") is tensor for s in states)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._trainer, self._mode = trainer, _Count(self)
        self._mode.__enter__()  # on the thread that runs the steps

    def _stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode, self._trainer = None, None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._stop()
