"""Atomic file writes: every file the project writes goes through a unique temporary name beside the target and a
rename, so a crash or a kill never leaves half a file and readers see the old file or the new one.

The temporary name is unique per process and call (two runs, or DDP ranks, writing one path do not collide), and
the finished file gets the permissions a plain ``open()`` would give it (``0o666`` less the user's umask): some
writers (safetensors, ``tempfile``) create ``0600`` files that another user's ComfyUI could not read.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique per process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``path`` (umask permissions), on error it is removed.

    With ``overwrite=False`` an existing ``path`` is never replaced, even one another process creates meanwhile:
    ``FileExistsError`` instead (the new name is a hard link where the filesystem has them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # fails if path exists
    except FileExistsError:
        raise FileExistsError(f"{path} exists") from None
    except OSError:  # no hard links on this filesystem: check, then rename
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)


def write_atomic(path: str | Path, write: Callable[[Path], Any], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` to produce the file, then move it to ``path`` atomically. An ``OSError`` (disk full,
    permission) names ``path``, not the temporary name: ``[Errno 28] No space left on device: 'path'``."""
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            write(tmp)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno is None or (e.filename is not None and not str(e.filename).endswith(TMP_SUFFIX)):
            raise
        raise type(e)(e.errno, e.strerror or os.strerror(e.errno), str(path)) from None
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_safetensors_atomic(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file (tensors made contiguous) with ``metadata`` in its header."""
    from safetensors.torch import save  # here, not at the top: configs use this module without torch

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    # serialized here and written by Python: a full disk is an OSError naming the file (safetensors' own writer
    # raises its own error type)
    data = save(contiguous, metadata=metadata)
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """A ``torch.save`` file (our own checkpoints: tensors and plain values, read back with ``weights_only=True``)."""
    import torch  # here, not at the top: configs use this module without torch

    def write(tmp: Path) -> None:
        # through a Python file: a full disk is an OSError (torch.save to a path raises "basic_ios::clear")
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write_atomic(path, write)


def move_folder_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete folder ``tmp`` to ``out``; into an existing, non-empty ``out``, replace each entry
    of ``tmp`` there atomically instead. A concurrent writer that renamed its copy first wins (same content)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if out.is_dir() and any(out.iterdir()):
                return
            raise
    for entry in tmp.iterdir():
        target = out / entry.name
        if target.is_dir() and entry.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
