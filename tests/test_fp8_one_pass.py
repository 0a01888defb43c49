"""FP8Linear's dequantize path in one pass: the per-output-channel scale goes on the activation side
(``y = (x @ W8^T) * s + b``, ``gx = (gy * s) @ W8``) where that moves fewer bytes than scaling the weight. The
old two-pass formula is kept here as the reference: with power-of-two scales both are bit-identical."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flux_lora.model.fp8 import FP8Linear

from helpers.numerics import rel_err


def _old_weight(layer: FP8Linear, dtype: torch.dtype) -> torch.Tensor:
    """The former ``dequantize_weight``: cast, then scale in place (two passes over the weight)."""
    return layer.weight.to(dtype).mul_(layer.weight_scale.to(dtype)[:, None])


def _old_forward_and_grad(layer: FP8Linear, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = _old_weight(layer, x.dtype)
    return F.linear(x, w, layer.bias.to(x.dtype)), g @ w


def _new_forward_and_grad(layer: FP8Linear, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y.detach(), gx


def _layer(out_f: int, in_f: int, dtype: torch.dtype, seed: int = 0) -> FP8Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    lin.weight.data.mul_(torch.logspace(-4, 1, out_f)[:, None])  # rows of very different magnitude: many scales
    lin.bias.data.normal_()
    return FP8Linear.from_linear(lin, bias_dtype=dtype)


@pytest.mark.parametrize("shape", [(3072, 3072), (12288, 3072)])
@pytest.mark.parametrize("rows", [(2, 8), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_is_bit_identical_to_the_old_formula(shape, rows, dtype):
    """Power-of-two scales commute with every rounding of the matmul, so moving them to the output (and to the
    output gradient) changes no bit of the output or the input gradient."""
    layer = _layer(*shape, dtype)
    scales = layer.weight_scale.unique()
    assert len(scales) > 5 and torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    x = torch.randn(*rows, shape[1], dtype=dtype)
    g = torch.randn(*rows, shape[0], dtype=dtype)
    y, gx = _new_forward_and_grad(layer, x, g)
    y_ref, gx_ref = _old_forward_and_grad(layer, x, g)
    assert y.dtype == gx.dtype == dtype
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_weight_side_route_when_rows_outnumber_inputs_is_also_bit_identical():
    layer = _layer(96, 32, torch.float32)
    x, g = torch.randn(4, 20, 32), torch.randn(4, 20, 96)  # 80 rows > 32 inputs: scaling the weight is cheaper
    y, gx = _new_forward_and_grad(layer, x, g)
    y_ref, gx_ref = _old_forward_and_grad(layer, x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_arbitrary_scales_stay_within_rounding(dtype, bound):
    """A checkpoint quantized elsewhere may carry any scale: then the two formulas round differently, by about
    float32 epsilon (float32) or one bf16 rounding step (bf16)."""
    layer = _layer(3072, 3072, dtype)
    layer.weight_scale.mul_(torch.empty(3072).uniform_(0.51, 0.99))
    x, g = torch.randn(2, 8, 3072, dtype=dtype), torch.randn(2, 8, 3072, dtype=dtype)
    y, gx = _new_forward_and_grad(layer, x, g)
    y_ref, gx_ref = _old_forward_and_grad(layer, x, g)
    assert not torch.equal(y, y_ref)  # the scales really are not powers of two
    assert rel_err(y, y_ref) < bound and rel_err(gx, gx_ref) < bound


class _WeightSized(TorchDispatchMode):
    """Records the aten ops whose output has as many elements as the weight (the passes over the weight)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.ops.append(str(func.overloadpacket.__name__))
        return out


@contextmanager
def _weight_passes(layer: FP8Linear) -> Iterator[list[str]]:
    mode = _WeightSized(layer.weight.numel())
    with mode:
        yield mode.ops


def test_few_rows_pay_one_cast_of_the_weight_and_no_scale_pass():
    """Forward and backward each touch the weight once (the cast: 1 byte read, 2 written), not cast + scale."""
    layer = _layer(256, 128, torch.float32)
    x = torch.randn(3, 128, requires_grad=True)
    with _weight_passes(layer) as ops:
        layer(x).sum().backward()
    assert ops == ["_to_copy", "_to_copy"], ops


def test_float16_keeps_the_weight_side_where_the_unscaled_product_would_overflow():
    """float16 tops out at 65504: ``x @ W8`` with e4m3 values up to 448 (and ``b / s``) can overflow there, so
    float16 scales the weight as before."""
    layer = _layer(64, 512, torch.float16)
    layer.bias.data.fill_(60.0)
    x, g = torch.full((2, 512), 4.0, dtype=torch.float16), torch.ones(2, 64, dtype=torch.float16)
    y, gx = _new_forward_and_grad(layer, x, g)
    y_ref, gx_ref = _old_forward_and_grad(layer, x, g)
    assert torch.isfinite(y).all() and torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
