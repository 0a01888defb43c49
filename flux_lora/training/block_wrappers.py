"""Training-time wrappers applied to a DiT from outside: activation checkpointing and regional compilation."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from flux_lora.model.layers import DoubleStreamBlock, SingleStreamBlock

_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)
"""The attention kernels whose outputs selective checkpointing keeps (the costliest op to recompute per byte)."""


def _save_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(_save_attention)


def enable_gradient_checkpointing(model: nn.Module, selective: bool = False) -> None:
    """Recompute each double and single block in backward (non-reentrant checkpoint wrappers, applied from outside;
    module names gain ``_checkpoint_wrapped_module.``, which
    :func:`flux_lora.lora.weight.clean_name` removes, and state dict keys are unchanged).

    ``selective``: keep the attention outputs (and their softmax statistics) from the forward and recompute only
    the rest, trading about 1.6 GB at 1024 px for not running attention a second time in backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if selective:
        wrap = partial(wrap, context_fn=_selective_contexts)
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=wrap,
        check_fn=lambda m: isinstance(m, (DoubleStreamBlock, SingleStreamBlock)),
    )


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> None:
    """``torch.compile`` every double and single block in place (regional compilation: the repeated blocks share
    one compiled graph per type, so compile time stays in seconds rather than minutes)."""
    for m in model.modules():
        if isinstance(m, (DoubleStreamBlock, SingleStreamBlock)):
            m.compile(**compile_kwargs)
