"""Reading safetensors checkpoints safely and streaming them into models built on the meta device.

Only safetensors is read (never a pickle). Tensors are read one at a time with plain file reads into memory of
their own, and assigned into the model in place of its meta tensors, so loading holds about one copy of the
weights, not two. They are not memory-mapped: a mapped 23.8 GB checkpoint counted as the process's resident
memory page by page as it was read (and for as long as any tensor viewed it), while the model held only 12 GB.
The file's pages already read are dropped from the page cache too (``POSIX_FADV_DONTNEED``).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Prefixes other tools put in front of DiT keys (ComfyUI / Forge single files, some merges).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and the offending keys."""


def open_safetensors(path: Path) -> Any:
    """Open ``path`` with safetensors, turning any failure into a :class:`CheckpointError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
            "only .safetensors checkpoints are accepted"
        ) from e


def read_metadata(path: Path) -> dict[str, str]:
    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


def read_keys(path: Path) -> list[str]:
    with open_safetensors(path) as f:
        return list(f.keys())


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape, read from the header only."""
    with open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_dtypes(path: Path) -> dict[str, str]:
    with open_safetensors(path) as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def detect_prefix(keys: list[str], marker: str) -> str:
    """The prefix in front of ``marker`` (a key every checkpoint of this kind has), e.g. ``model.diffusion_model.``."""
    for k in keys:
        if k.endswith(marker):
            return k[: -len(marker)]
    return ""


# safetensors dtype names -> torch dtypes read with plain file reads (others go through safetensors itself)
READ_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(offset of the tensor data, JSON header)`` of a safetensors file (validated by :func:`open_safetensors`)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def iter_tensors(
    path: Path, prefix: str = "", skip: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key without prefix, tensor)`` for the keys under ``prefix``, in file order; each tensor is read
    into memory of its own (nothing stays mapped) and its pages are then dropped from the page cache."""
    with open_safetensors(path) as st:  # validates the header: offsets in bounds, sizes matching shapes
        start, header = read_header(path)
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__" and k.startswith(prefix)),
            key=lambda kv: kv[1]["data_offsets"][0],
        )
        with open(path, "rb", buffering=0) as f:
            for key, entry in entries:
                name = key[len(prefix) :]
                if skip is not None and skip(name):
                    continue
                dtype = READ_DTYPES.get(entry["dtype"])
                yield name, st.get_tensor(key) if dtype is None else _read(f, start, entry, dtype)


def _read(f: Any, start: int, entry: dict[str, Any], dtype: torch.dtype) -> Tensor:
    begin, end = (start + o for o in entry["data_offsets"])
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(begin)
    view, done = buf.numpy().data, 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{f.name}: file ends inside tensor data at byte {begin + done}")
        done += n
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), begin, end - begin, os.POSIX_FADV_DONTNEED)
    return buf.view(dtype).reshape(entry["shape"])


def sharded_files(folder: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors files of a diffusers component folder (single file or index + shards)."""
    folder = Path(folder)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing[:3]}")
        return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{folder} holds no .safetensors file (looked for {stem}.safetensors and an index)")
    return found


def assign_tensor(model: nn.Module, key: str, tensor: Tensor) -> None:
    """Replace the parameter or buffer ``key`` of ``model`` (typically a meta tensor) by ``tensor``."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(key)


def target_shapes(model: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {k: (t.shape, t.dtype) for k, t in model.state_dict(keep_vars=True).items()}


def meta_keys(model: nn.Module) -> list[str]:
    """Keys whose tensors were never loaded (still on the meta device)."""
    return [k for k, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
