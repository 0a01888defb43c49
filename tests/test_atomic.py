"""The one atomic writer: whole files or none, unique temporary names, umask permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_lora.atomic import save_safetensors_atomic, save_torch_atomic, write_atomic, write_text_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_get_the_umask_permissions_not_0600(tmp_path, umask_022):
    """safetensors creates 0600 files; a LoRA another user's ComfyUI reads must come out 0644 under umask 022."""
    lora = save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "lora.safetensors", {"k": "v"})
    ckpt = save_torch_atomic({"step": 1}, tmp_path / "x.ckpt")
    text = write_text_atomic(tmp_path / "c.yaml", "a: 1\n")
    assert [_mode(p) for p in (lora, ckpt, text)] == [0o644] * 3
    assert torch.equal(load_file(lora)["a"], torch.ones(2))
    assert torch.load(ckpt, weights_only=True) == {"step": 1}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "sub" / "f.txt", "old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_temporary_names_are_unique_per_call(tmp_path):
    seen: list[str] = []
    for _ in range(3):
        write_atomic(tmp_path / "f", lambda tmp: (seen.append(tmp.name), tmp.write_text("x")))
    assert len(set(seen)) == 3 and all(name.startswith(".f.") and name.endswith(".tmp") for name in seen)


def test_no_overwrite_refuses_an_existing_file_and_keeps_it(tmp_path):
    target = write_text_atomic(tmp_path / "out.png", "first")
    with pytest.raises(FileExistsError, match="out.png exists"):
        write_atomic(target, lambda tmp: tmp.write_text("second"), overwrite=False)
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    fresh = write_atomic(tmp_path / "new.png", lambda tmp: tmp.write_text("x"), overwrite=False)
    assert fresh.read_text() == "x"
