"""The modulation Linears (one conditioning vector per sample) on fp8 GEMMs: with ``fp8_matmul`` on they read
their 1-byte weights through ``torch._scaled_mm`` instead of dequantizing 3.2 B weights per forward; the few
rows are padded to the multiple of 16 that CUDA's fp8 GEMM needs. Error bounds against the float path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.fp8 import FP8Linear, default_predicate, quantize_, set_fp8_matmul

from helpers.numerics import rel_err


class _ScaledMMRows(TorchDispatchMode):
    """Records the row count of every ``_scaled_mm`` left operand."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._scaled_mm:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("out_features", [6 * 3072, 3 * 3072])  # double-block and single-block modulation
@pytest.mark.parametrize("batch", [1, 3])
def test_modulation_error_at_flux_shapes_and_rows_padded_to_16(out_features, batch):
    """One e4m3 vector per sample: about 2.6 % relative error in the output and the input gradient against the
    float (dequantize) path on the same fp8 weight; bounded at 4 %. The GEMMs see 16 rows, the caller ``batch``."""
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(torch.nn.Linear(3072, out_features), bias_dtype=torch.bfloat16)
    x = torch.nn.functional.silu(torch.randn(batch, 3072, dtype=torch.bfloat16)).requires_grad_()
    ref = layer(x)
    g = torch.randn_like(ref)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    layer.fp8_matmul = True
    mode = _ScaledMMRows()
    with mode:
        out = layer(x)
        (gx,) = torch.autograd.grad(out, x, g)
    assert mode.rows == [16, 16]
    assert out.shape == ref.shape and gx.shape == x.shape and out.dtype == torch.bfloat16
    assert 0.005 < rel_err(out.detach(), ref.detach()) < 0.04
    assert 0.005 < rel_err(gx, gx_ref) < 0.04


def test_every_block_linear_switches_modulation_included_nothing_outside_the_blocks():
    model = quantize_(Flux(PRESETS["tiny"]), default_predicate("all"))
    set_fp8_matmul(model)
    switched = {n for n, m in model.named_modules() if isinstance(m, FP8Linear) and m.fp8_matmul}
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert {"double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin"} <= switched
    assert switched == {n for n in fp8 if n.startswith(("double_blocks.", "single_blocks."))}
    assert "final_layer.adaLN_modulation.1" not in switched and "img_in" not in switched
    set_fp8_matmul(model, False)
    assert not any(m.fp8_matmul for m in model.modules() if isinstance(m, FP8Linear))
