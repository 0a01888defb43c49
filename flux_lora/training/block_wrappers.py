"""Training-time wrappers applied to a DiT from outside: activation checkpointing and regional compilation."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from flux_lora.model.layers import DoubleStreamBlock, SingleStreamBlock


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each double and single block in backward (non-reentrant checkpoint wrappers, applied from outside;
    module names gain ``_checkpoint_wrapped_module.``, which
    :func:`flux_lora.lora.weight.clean_name` removes, and state dict keys are unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, (DoubleStreamBlock, SingleStreamBlock)),
    )


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> None:
    """``torch.compile`` every double and single block in place (regional compilation: the repeated blocks share
    one compiled graph per type, so compile time stays in seconds rather than minutes)."""
    for m in model.modules():
        if isinstance(m, (DoubleStreamBlock, SingleStreamBlock)):
            m.compile(**compile_kwargs)
