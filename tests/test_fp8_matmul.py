"""fp8 GEMMs (``torch._scaled_mm``, which runs on this CPU) for the token-path Linears: error bounds at real FLUX
layer shapes against the dequantize path, the exact power-of-two fold in backward, and a tiny LoRA that still
learns with them on (modulation included; its own bounds and which layers switch: ``test_fp8_modulation.py``)."""

from __future__ import annotations

import pytest
import torch

from flux_lora.lora.peft_adapters import trainable_parameters
from flux_lora.model.flux import PRESETS
from flux_lora.model.fp8 import FP8Linear, set_fp8_matmul
from flux_lora.model.fp8_matmul import quantize_rows

from helpers.dit import dit_inputs, lora_dit


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", [(3072, 3072), (12288, 3072), (3072, 12288)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_input_gradient_error_at_flux_layer_shapes(shape, dtype):
    """Per-token e4m3 activations cost about 2.7 % relative error in the output and in the input gradient (the
    fp8 weight is shared by both paths, so this is the error the fp8 GEMM adds); bounded at 4 %."""
    out_f, in_f = shape
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(torch.nn.Linear(in_f, out_f))
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(1, 96, in_f, dtype=dtype, requires_grad=True)
    ref = layer(x)
    g = torch.randn_like(ref)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    layer.fp8_matmul = True
    out = layer(x)
    (gx,) = torch.autograd.grad(out, x, g)
    assert out.dtype == ref.dtype == dtype and gx.dtype == dtype
    assert 0.005 < _rel(out, ref) < 0.04
    assert 0.005 < _rel(gx, gx_ref) < 0.04
    assert layer.weight.grad is None


def test_rows_are_quantized_independently_and_zero_rows_stay_zero():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1e-3, 0.0, -4e-3]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 1)
    assert torch.equal(q.float().abs().amax(dim=1)[[0, 2]], torch.tensor([448.0, 448.0]))
    assert torch.equal(q[1].float(), torch.zeros(3))
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=0)


def test_power_of_two_weight_scales_fold_exactly():
    """The stored per-row scales are powers of two, so folding them into the gradient before quantizing loses
    nothing: doubling every scale doubles the output and the input gradient bit for bit."""
    torch.manual_seed(1)
    layer = FP8Linear.from_linear(torch.nn.Linear(64, 32, bias=False))
    layer.fp8_matmul = True
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 32)
    y1 = layer(x)
    (gx1,) = torch.autograd.grad(y1, x, g)
    layer.weight_scale.mul_(2)
    y2 = layer(x)
    (gx2,) = torch.autograd.grad(y2, x, g)
    assert torch.equal(y2, 2 * y1) and torch.equal(gx2, 2 * gx1)


def test_tiny_lora_learns_with_fp8_matmuls():
    """A rank-4 LoRA fitting a fixed target through fp8 GEMMs (forward and input gradients, token path and
    modulation: tiny rows padded to 16) still learns."""
    p = PRESETS["tiny"]
    model = lora_dit(p)
    assert set_fp8_matmul(model) > 0
    modulations = [
        m for n, m in model.named_modules() if n.endswith(("_mod.lin.base_layer", "modulation.lin.base_layer"))
    ]
    assert modulations and all(m.fp8_matmul for m in modulations)  # peft's wrapping does not hide them
    inputs = dit_inputs(p, lat_h=8, lat_w=8, txt_len=5, seed=0)
    target = torch.randn(inputs["img"].shape, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(**inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
