"""fp8 matrix multiplies for a frozen fp8 Linear: ``torch._scaled_mm`` forward and input gradient.

Forward: each token's activation row is scaled into e4m3 range and cast (``x ~= xq * sx[:, None]``); the stored
fp8 weight ``W ~= Wq * sw[:, None]`` is used as it is, so ``y = (xq @ Wq^T) * sx[:, None] * sw[None, :]`` is one
fp8 GEMM with row-wise scales.

Input gradient: ``dx = g @ W = (g * sw[None, :]) @ Wq``. The weight's per-row scale sits on the contraction
dimension, where ``_scaled_mm`` takes no scale, so it is folded into the gradient first; being a power of two it
folds exactly. The folded gradient is quantized per row to e4m3 and multiplied by a transposed copy of ``Wq``
made on the fly (fp8, 1 byte per weight). The weight never gets a gradient.

The dequantize path (``fp8.py``) stays the default: it is exact to bf16 rounding, while these GEMMs add about 2-3 %
relative error per layer (measured in ``tests/test_fp8_matmul.py`` and ``tests/test_fp8_modulation.py``) for the
fp8 tensor-core throughput. Every block Linear uses it when switched on: the token path (attention qkv/proj,
MLPs, single-block linear1/linear2) and the modulation Linears, which see one vector per sample and would
otherwise dequantize their 3.2 B weights per forward; here they read 1 byte per weight. The few rows are padded
to the multiple of 16 that CUDA's fp8 GEMM needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flux_lora.dtypes import FP8

FP8_MAX = torch.finfo(FP8).max
ROW_MULTIPLE = 16  # CUDA's fp8 GEMM wants every dimension a multiple of 16; the weight's always are
_TINY = 2.0**-60  # floor of a row's scale, so all-zero rows quantize to zeros instead of NaN


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[M, K]`` -> (e4m3 ``[M, K]``, float32 scale ``[M, 1]``) with ``x ~= q * scale``, each row's largest
    magnitude mapped to 448."""
    scale = (x.detach().abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)
    return (x.float() / scale).to(FP8), scale


def pad_rows(x: Tensor) -> Tensor:
    """``[M, K]`` -> ``[M', K]`` with zero rows appended up to a multiple of :data:`ROW_MULTIPLE` (``x`` itself
    when it already is one)."""
    pad = -x.shape[0] % ROW_MULTIPLE
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def scaled_mm_supported(device: torch.device) -> bool:
    """fp8 GEMMs with row-wise scales run here: CUDA compute capability >= 8.9 (Ada, Hopper) or the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


class FP8ScaledMatmul(torch.autograd.Function):
    """``y = x W^T + b`` with ``W = weight * scale[:, None]`` frozen in e4m3, both GEMMs in fp8."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        shape = x.shape
        rows = x.numel() // shape[-1]
        xq, sx = quantize_rows(pad_rows(x.reshape(rows, shape[-1])))
        y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=scale.float()[None, :], out_dtype=dtype)[:rows]
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(weight, scale)
        ctx.x_dtype = x.dtype
        ctx.dtype = dtype
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        weight, scale = ctx.saved_tensors
        shape = grad_out.shape
        rows = grad_out.numel() // shape[-1]
        g = grad_out.reshape(rows, shape[-1]).float() * scale.float()[None, :]  # exact: powers of two
        gq, sg = quantize_rows(pad_rows(g))
        w_t = weight.t().contiguous().t()  # [out, in] in column-major order, as _scaled_mm wants its B operand
        ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
        grad_x = torch._scaled_mm(gq, w_t, scale_a=sg, scale_b=ones, out_dtype=ctx.dtype)[:rows]
        return grad_x.reshape(*shape[:-1], weight.shape[1]).to(ctx.x_dtype), None, None, None, None
