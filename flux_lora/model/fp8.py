"""float8_e4m3fn weight storage with bf16 (or any float) compute.

:class:`FP8Linear` is an ``nn.Linear`` (so peft wraps it like any Linear) whose ``weight`` is stored in
float8_e4m3fn with a float32 scale per output channel (or, for a file stored so, float8_e5m2 with the file's own
scale, kept as it is). Its forward and backward go through :class:`_FP8Matmul`,
which saves the *fp8* weight for backward and re-casts it there: no bf16 copy of any weight outlives the op that
needs it (autocast or ``weight.to(bf16)`` inside autograd would keep one per layer alive until backward).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_lora.dtypes import FP8, FP8_DTYPES
from flux_lora.model.fp8_matmul import FP8ScaledMatmul
from flux_lora.model.layers import WRAPPED

log = logging.getLogger(__name__)

FP8_MAX = torch.finfo(FP8).max  # 448
QuantPolicy = Literal["blocks", "all"]
BLOCKS = ("double_blocks.", "single_blocks.")  # BFL name prefixes of the block Linears


def quantize_weight(weight: Tensor, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """``[out, in]`` float weight -> (fp8 weight, float32 scale ``[out]``) with ``weight ~= fp8 * scale[:, None]``.

    Per channel, the scale is the power of two that brings each row's largest magnitude into (224, 448], so
    small weights stay out of e4m3's subnormal range; a power of two is exact in bf16, so dequantizing in the
    compute dtype adds no rounding of its own. With ``per_channel=False`` the scale is 1 (the plain cast other
    tools use) and values beyond 448 saturate. On the CPU rows go in chunks of about a million elements, so
    quantizing while loading never holds a float copy of a whole weight.
    """
    rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    scale = torch.ones(rows, dtype=torch.float32, device=weight.device)
    step = max(1, (1 << 20) // max(1, weight[0].numel())) if weight.device.type == "cpu" else rows
    for i in range(0, rows, step):
        w = weight[i : i + step].float()
        if per_channel:
            amax = w.abs().amax(dim=1).clamp(min=2.0**-100)
            scale[i : i + step] = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
            w = w / scale[i : i + step, None]
        else:
            w = w.clamp(-FP8_MAX, FP8_MAX)
        q[i : i + step] = w.to(FP8)
    return q, scale


def dequantize_weight(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8 ``[out, in]`` and scale ``[out]`` -> ``dtype`` weight (scaled in place: one float copy, not two)."""
    return weight.to(dtype).mul_(scale.to(dtype)[:, None])


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_WIDE = (torch.float32, torch.bfloat16, torch.float64)  # 8+ exponent bits: the unscaled ``x @ W8^T`` cannot overflow


def scale_on_activations(rows: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether to apply the per-output-channel scale to the ``[rows, out]`` output (and output gradient) rather
    than to the ``[out, in]`` weight.

    Eagerly, scaling the weight is a second pass over it (cast, then scale: 7 bytes per weight instead of 3) and
    scaling the output is a pass over ``rows * out`` values (4 bytes each), so the output side wins when
    ``rows < in_features``: always for the modulation Linears (one row per sample) and the text stream, at
    small images for the rest. Compiled, the cast and the scale of the weight fuse into one kernel while the
    output scale would still be a pass of its own, so the weight side is kept there; so it is in float16, where
    the unscaled product (e4m3 values up to 448) could overflow.
    """
    return rows < in_features and dtype in _WIDE and not torch.compiler.is_compiling()


class _FP8Matmul(torch.autograd.Function):
    """``y = x W^T + b`` for a frozen fp8 ``W``; saves only the fp8 weight and its scale for backward.

    With :func:`scale_on_activations`: ``y = (x @ W8^T + b / s) * s`` and ``gx = (g * s) @ W8``, where the weight
    is only cast. Our scales are powers of two, so this is bit-identical to scaling the weight (barring
    subnormals); an arbitrary scale from elsewhere differs by one rounding."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        dtype = _compute_dtype(x)
        ctx.save_for_backward(weight, scale)
        ctx.x_dtype = x.dtype
        ctx.compute_dtype = dtype
        ctx.on_activations = scale_on_activations(x.numel() // x.shape[-1], weight.shape[1], dtype)
        with torch.autocast(x.device.type, enabled=False):
            b = None if bias is None else bias.to(dtype)
            if not ctx.on_activations:
                return F.linear(x.to(dtype), dequantize_weight(weight, scale, dtype), b)
            s = scale.to(dtype)
            return F.linear(x.to(dtype), weight.to(dtype), None if b is None else b / s).mul_(s)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        weight, scale = ctx.saved_tensors
        dtype = ctx.compute_dtype
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.on_activations:
                grad_x = (grad_out.to(dtype) * scale.to(dtype)) @ weight.to(dtype)
            else:
                grad_x = grad_out.to(dtype) @ dequantize_weight(weight, scale, dtype)
        return grad_x.to(ctx.x_dtype), None, None, None


class FP8Linear(nn.Linear):
    """A frozen Linear stored in float8_e4m3fn (+ float32 per-output-channel ``weight_scale``), computed in the
    input's dtype (or the autocast dtype). Its weight and bias never receive gradients.

    The loader may also store a file's float8_e5m2 weight here as it is, with the file's scale: re-encoding it in
    e4m3 would round it a second time. Such a layer computes through the dequantize path, also with
    ``fp8_matmul`` (row-wise scaled fp8 GEMMs take e4m3 operands)."""

    weight_scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.bfloat16,
    ):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, per_channel: bool = True, bias_dtype: torch.dtype | None = None
    ) -> FP8Linear:
        """Quantize a float Linear (or rebuild an empty one when its weight is on the meta device)."""
        w = linear.weight
        bias_dtype = bias_dtype or (
            w.dtype if w.dtype.is_floating_point and w.dtype not in FP8_DTYPES else torch.bfloat16
        )
        out = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device=w.device, bias_dtype=bias_dtype
        )
        if w.device.type == "meta":
            return out
        if w.dtype in FP8_DTYPES:  # already fp8 (a plain cast): keep the bytes, scale 1
            q, scale = w.detach(), torch.ones(w.shape[0], device=w.device)
        else:
            q, scale = quantize_weight(w.detach(), per_channel)
        out.weight.data = q
        out.weight_scale.copy_(scale)
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().to(bias_dtype)
        return out

    fp8_matmul = False
    """Multiply in fp8 (``torch._scaled_mm``) instead of dequantizing; set by :func:`set_fp8_matmul`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8_matmul and self.weight.dtype == FP8:
            dtype = _compute_dtype(x)
            with torch.autocast(x.device.type, enabled=False):
                return FP8ScaledMatmul.apply(x, self.weight, self.weight_scale, self.bias, dtype)
        return _FP8Matmul.apply(x, self.weight, self.weight_scale, self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def to_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        lin = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=self.weight.device, dtype=dtype
        )
        lin.weight.data = self.dequantized_weight(dtype)
        if self.bias is not None:
            lin.bias.data = self.bias.detach().to(dtype)
        lin.requires_grad_(False)
        return lin

    def set_weight(self, weight: Tensor, per_channel: bool = True) -> None:
        """Re-quantize from a float weight (used when fusing a LoRA into an fp8 layer)."""
        q, scale = quantize_weight(weight, per_channel)
        self.weight.data = q.to(self.weight.device)
        self.weight_scale.copy_(scale)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FP8Linear:
        # Keep the fp8 storage through module.to(dtype)/half()/bfloat16(): only device moves apply to it.
        # (Lightning's "bf16-true" and plain .to(bfloat16) would otherwise upcast the weight silently.)
        weight, scale = self.weight.data, self.weight_scale.data  # conversions may replace .data in place
        result = super()._apply(fn, recurse)
        if self.weight.dtype not in FP8_DTYPES:
            log.debug("FP8Linear kept its float8 weight through a dtype conversion")
            self.weight.data = weight.to(self.weight.device)
            self.weight_scale = scale.to(self.weight.device)
        return result

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, storage={str(self.weight.dtype).removeprefix('torch.')}"
        )


def default_predicate(policy: QuantPolicy = "blocks") -> Callable[[str, nn.Module], bool]:
    """Which Linears to store in fp8.

    ``blocks``: every Linear inside the double and single blocks (including their modulation), the 99.4 % of the
    weights that the model's cost and memory come from; embedders and the final layer stay in the float dtype.
    ``all``: every Linear.
    """
    if policy == "all":
        return lambda name, m: isinstance(m, nn.Linear)
    if policy == "blocks":
        return lambda name, m: isinstance(m, nn.Linear) and name.startswith(BLOCKS)
    raise ValueError(f"unknown quantization policy {policy!r}; use 'blocks' or 'all'")


def quantize_(
    model: nn.Module, predicate: Callable[[str, nn.Module], bool] | None = None, per_channel: bool = True
) -> nn.Module:
    """Replace the selected ``nn.Linear`` modules of ``model`` in place by :class:`FP8Linear`.

    Works on real weights and on a model built on the meta device (then only the structure changes, and loading
    fills in the fp8 weights). Returns ``model``.
    """
    predicate = predicate or default_predicate("blocks")
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and predicate(n, m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(module, per_channel=per_channel))
    log.debug("quantized %d Linear layers to float8_e4m3fn", len(targets))
    return model


def storage_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


MODULATION_SUFFIXES = ("_mod.lin", "modulation.lin", "adaLN_modulation.1")


def is_token_path(name: str) -> bool:
    """A block Linear that sees every token (attention qkv/proj, MLPs, linear1/linear2), not a modulation."""
    return name.startswith(BLOCKS) and not name.endswith(MODULATION_SUFFIXES)


def set_fp8_matmul(model: nn.Module, enabled: bool = True) -> int:
    """Switch the :class:`FP8Linear` layers in the blocks of ``model`` (token path and modulation) to fp8 GEMMs
    (or back); returns how many."""
    count = 0
    for name, module in model.named_modules():
        # the BFL path, also under checkpoint wrappers and peft (whose LoRA layer keeps the Linear as base_layer)
        path = name.replace(f"{WRAPPED}.", "").removesuffix(".base_layer")
        if isinstance(module, FP8Linear) and path.startswith(BLOCKS):
            module.fp8_matmul = enabled
            count += 1
    return count
