"""Writing a random DiT of any size to one safetensors file without ever holding it whole in memory.

The header is computed from the model built on the meta device; then each top-level part (an embedder, one
double or single block, the final layer) is materialised, filled with random weights, written and freed. Peak
memory is one block in float32, about 1.4 GB for FLUX.1-dev's largest (a double block), not the 23.8 GB file.
The file is a plain safetensors file (8-byte header length, JSON header, tensor bytes in header order) that
``safetensors`` and our loader read like any other, written atomically.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from flux_lora.atomic import atomic_path
from flux_lora.model.flux import Flux, FluxParams

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
ALIGNMENT = 8  # safetensors pads its header so the tensor data starts 8-byte aligned


def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header of a file holding ``shapes`` (in this order, back to back) in ``dtype``."""
    item = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, shape in shapes.items():
        size = item * int(torch.Size(shape).numel())
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def _parts(model: Flux) -> Iterator[tuple[str, nn.Module]]:
    """Top-level parts of the DiT, one block at a time."""
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                yield f"{name}.{i}", block
        else:
            yield name, child


def _materialise(part: nn.Module, seed: int) -> None:
    """Fill a meta-built part with random float32 weights: PyTorch's default init, RMSNorm scales around 1 (as
    :func:`flux_lora.weights.tiny.random_flux`)."""
    part.to_empty(device="cpu")
    torch.manual_seed(seed)
    for m in part.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    for name, p in part.named_parameters():
        if name.endswith("scale"):
            nn.init.uniform_(p, 0.5, 1.5)


def _write_tensor(f: BinaryIO, t: torch.Tensor, dtype: torch.dtype) -> None:
    f.write(t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_random_dit(
    path: str | Path,
    params: FluxParams,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a random DiT of architecture ``params`` to ``path`` (safetensors, BFL key names), part by part."""
    with torch.device("meta"):
        model = Flux(params)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    header = safetensors_header(shapes, dtype, metadata or {})
    written: list[str] = []
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for i, (prefix, part) in enumerate(_parts(model)):
            _materialise(part, seed * 1000 + i)
            for key, t in part.state_dict().items():
                _write_tensor(f, t, dtype)
                written.append(f"{prefix}.{key}")
            part.to_empty(device="meta")  # free this part before the next one
        if written != list(shapes):
            raise RuntimeError(f"{path}: tensors written out of header order ({len(written)} of {len(shapes)})")
    log.info("wrote %s: %d tensors, %.2f GB", path, len(shapes), Path(path).stat().st_size / 1e9)
    return Path(path)
