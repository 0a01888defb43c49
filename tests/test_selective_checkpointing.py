"""Selective activation checkpointing: attention outputs are kept from the forward, everything else is
recomputed; gradients equal plain checkpointing and no checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flux_lora import sampling as S
from flux_lora.config import LoraConfig
from flux_lora.lora.peft_adapters import inject_lora, trainable_parameters
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.training.block_wrappers import enable_gradient_checkpointing


class CountAttention(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _model() -> Flux:
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny"])
    model.requires_grad_(False)
    inject_lora(model, LoraConfig(rank=4, alpha=4.0, init="gaussian"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


def _inputs() -> dict:
    p, g = PRESETS["tiny"], torch.Generator().manual_seed(1)
    return dict(
        img=S.pack(torch.randn(2, p.in_channels // 4, 8, 8, generator=g)),
        img_ids=S.img_ids(2, 8, 8),
        txt=torch.randn(2, 5, p.context_in_dim, generator=g),
        txt_ids=S.txt_ids(2, 5),
        timesteps=torch.full((2,), 0.4),
        y=torch.randn(2, p.vec_in_dim, generator=g),
        guidance=torch.full((2,), 1.0),
    )


def _grads(model: Flux) -> tuple[list[torch.Tensor], int, int]:
    fwd, bwd = CountAttention(), CountAttention()
    with fwd:
        loss = model(**_inputs()).square().mean()
    with bwd:
        grads = torch.autograd.grad(loss, trainable_parameters(model))
    return list(grads), fwd.calls, bwd.calls


@pytest.mark.parametrize("selective", [False, True])
def test_attention_recomputed_only_without_selective(selective):
    plain = _model()
    ref, fwd_ref, bwd_ref = _grads(plain)
    model = copy.deepcopy(plain)
    enable_gradient_checkpointing(model, selective=selective)
    grads, fwd, bwd = _grads(model)
    blocks = len(model.double_blocks) + len(model.single_blocks)
    assert fwd == fwd_ref == blocks and bwd_ref == 0
    assert bwd == (0 if selective else blocks)  # plain checkpointing runs each block's attention again
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
