"""Run by tests/test_signals.py: ``train.main`` with an extra callback that sends this process ``SIGNAL`` in
the middle of optimizer step ``AT`` (env ``KILL_AT``, ``KILL_SIGNAL``); exits with train.main's code."""

import os
import signal
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).parents[1]))

import train  # noqa: E402
from flux_lora.training import run as run_module  # noqa: E402


class SelfSignal(L.Callback):
    def on_before_backward(self, trainer, module, loss):
        if trainer.global_step + 1 == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIGNAL"]))


_build = run_module.build


def build(*args, **kwargs):
    trainer, module, dm = _build(*args, **kwargs)
    if os.environ.get("KILL_AT"):
        trainer.callbacks.insert(0, SelfSignal())
    return trainer, module, dm


run_module.build = build

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
