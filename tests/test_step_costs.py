"""Work a training step does not need: peft's input cast under autocast, and three zero-filled gradients in
split_heads' backward. Removing each changes no result."""

from __future__ import annotations

import copy

import torch

from flux_lora import sampling as S
from flux_lora.config import LoraConfig
from flux_lora.lora.peft_adapters import inject_lora, set_input_casting, trainable_parameters
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.fp8 import quantize_


def _step(model: Flux, inputs: dict, target: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.mse_loss(model(**inputs).float(), target)
    params = trainable_parameters(model)
    return loss.detach(), list(torch.autograd.grad(loss, params))


def test_no_input_cast_under_autocast_is_bit_identical():
    torch.manual_seed(0)
    p = PRESETS["tiny"]
    base = Flux(p)
    quantize_(base)
    base.requires_grad_(False)
    inject_lora(base, LoraConfig(rank=4, alpha=4.0, init="gaussian"))
    for name, param in base.named_parameters():  # non-zero B, so every adapter contributes
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    b, h, w = 2, 8, 8
    inputs = dict(
        img=S.pack(torch.randn(b, p.in_channels // 4, h, w, generator=g)),
        img_ids=S.img_ids(b, h, w),
        txt=torch.randn(b, 5, p.context_in_dim, generator=g),
        txt_ids=S.txt_ids(b, 5),
        timesteps=torch.full((b,), 0.3),
        y=torch.randn(b, p.vec_in_dim, generator=g),
        guidance=torch.full((b,), 1.0),
    )
    target = torch.randn(b, (h // 2) * (w // 2), p.in_channels, generator=g)
    fast = copy.deepcopy(base)
    set_input_casting(fast, False)
    loss_ref, grads_ref = _step(base, inputs, target)
    loss, grads = _step(fast, inputs, target)
    assert torch.equal(loss, loss_ref)
    assert len(grads) == len(grads_ref) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    casting = [m.cast_input_dtype_enabled for m in fast.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert casting and not any(casting)


def test_split_heads_unbinds_in_one_backward_node():
    from flux_lora.model.layers import split_heads

    qkv = torch.randn(2, 5, 3 * 2 * 4, requires_grad=True)
    q, k, v = split_heads(qkv, num_heads=2)
    assert q.shape == (2, 2, 5, 4) and q.grad_fn is k.grad_fn is v.grad_fn
    assert "Unbind" in type(q.grad_fn).__name__
    ref = qkv.detach().reshape(2, 5, 3, 2, 4)
    assert torch.equal(q, ref[:, :, 0].transpose(1, 2)) and torch.equal(v, ref[:, :, 2].transpose(1, 2))
