"""Names of dtypes as they appear in configs and on the command line, and the one quantize setting."""

from __future__ import annotations

import torch
from torch import nn

from flux_lora.names import QUANTIZE_VALUES as QUANTIZE_VALUES  # re-exported: configs read them without torch
from flux_lora.names import Quantize as Quantize

FP8 = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Compute dtypes by the names configs and command lines use."""


def check_quantize(quantize: str | None, what: str = "quantize") -> Quantize | None:
    """``quantize`` itself when it is ``None`` or a supported storage dtype; otherwise one clear error."""
    if quantize is not None and quantize not in QUANTIZE_VALUES:
        raise ValueError(f"{what} must be None or one of {list(QUANTIZE_VALUES)}, got {quantize!r}")
    return quantize  # type: ignore[return-value]


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (names as in cache keys and configs)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, what: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is one clear error."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {name!r}") from None


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the first floating-point, non-fp8 parameter (the compute dtype of an fp8 DiT)."""
    for p in module.parameters():
        if p.dtype.is_floating_point and p.dtype not in FP8_DTYPES:
            return p.dtype
    return torch.float32
