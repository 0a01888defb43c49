"""Cheap, content-based identities of encoders, for keying the embedding and latent cache.

A fingerprint must change whenever the weights or tokenizer change, yet must not read a 9.5 GB T5 file each
run. Files up to ``FULL_HASH_BYTES`` (configs, tokenizer files, small models) are hashed whole. Larger
safetensors files are hashed by their size, their whole header (names, dtypes, shapes, offsets) and
``SAMPLED_CHUNKS`` chunks spread evenly over the data section: a fine-tune or a re-quantization changes
practically every chunk, so it changes the fingerprint. Loaded modules are fingerprinted by hashing every
tensor of their state dict.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

FULL_HASH_BYTES = 8 << 20
SAMPLED_CHUNKS = 32
CHUNK_BYTES = 1 << 16
# Files of a model folder that define what the encoder computes (weights, configs, tokenizer data). READMEs,
# licences and pickled .bin weights (never loaded here) are left out, so editing them does not invalidate a
# cache.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".tiktoken")
IGNORED_NAMES = ("README.md", "LICENSE.txt", "LICENSE.md")


def _hash_stream(h: Any, f: BinaryIO, size: int) -> None:
    remaining = size
    while remaining > 0:
        block = f.read(min(remaining, 1 << 20))
        if not block:
            break
        h.update(block)
        remaining -= len(block)


def fingerprint_file(path: str | Path) -> str:
    """sha256 hex digest of one file's content (sampled for large safetensors files, see the module doc)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(b"flux-lora-file-v1")
    h.update(struct.pack("<Q", size))
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES or path.suffix != ".safetensors":
            _hash_stream(h, f, size)
            return h.hexdigest()
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise ValueError(f"{path}: safetensors header length {header_len} exceeds the file size {size}")
        h.update(f.read(header_len))
        start, span = 8 + header_len, max(size - 8 - header_len - CHUNK_BYTES, 0)
        for i in range(SAMPLED_CHUNKS):
            f.seek(start + span * i // max(SAMPLED_CHUNKS - 1, 1))
            h.update(f.read(CHUNK_BYTES))
    return h.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """The files under ``folder`` that take part in its fingerprint, in a stable order."""
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in MODEL_FILE_SUFFIXES
        and p.name not in IGNORED_NAMES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def fingerprint_paths(paths: Iterable[str | Path]) -> str:
    """One fingerprint over files and folders (a folder contributes its model files with their relative
    names).

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no model file.
    """
    h = hashlib.sha256(b"flux-lora-paths-v1")
    for path in map(Path, paths):
        if path.is_file():
            h.update(b"file\0" + fingerprint_file(path).encode())
        elif path.is_dir():
            files = model_files(path)
            if not files:
                raise FileNotFoundError(f"{path} holds no model file ({', '.join(MODEL_FILE_SUFFIXES)})")
            h.update(b"dir\0")
            for f in files:
                h.update(f.relative_to(path).as_posix().encode() + b"\0" + fingerprint_file(f).encode())
        else:
            raise FileNotFoundError(f"{path}: no such file or folder to fingerprint")
    return h.hexdigest()


def fingerprint_module(module: nn.Module, extra: Iterable[str] = ()) -> str:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes) of an in-memory module, plus ``extra``
    strings (e.g. a serialized tokenizer). Reads all weights: meant for small or already-loaded modules."""
    h = hashlib.sha256(b"flux-lora-module-v1")
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for s in extra:
        h.update(b"extra\0" + s.encode())
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """A string that changes with a tokenizer's vocabulary and rules (fast tokenizers: their full JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return str(backend.to_str())
    return repr(sorted(tokenizer.get_vocab().items()))
