"""Large datasets: planning a fully cached set reads no image and lists no cache folder (issue 24's size
properties, checked by counting, not by timing; benchmarks/scale_100k.py has the figures)."""

from __future__ import annotations

import builtins
import io
import os
import time
from pathlib import Path

import pytest

from flux_lora.data import cache as cache_module
from flux_lora.data.cache import fill_cache

from helpers.cache import Loaders, forbidden, setup_run, write_data


def _age(folder: Path, seconds: float = 60) -> None:
    past = time.time() - seconds
    for p in folder.rglob("*"):
        os.utime(p, (past, past))


class Opens:
    """Records every file opened through ``open``/``io.open`` and every folder listed with ``os.scandir`` /
    ``os.listdir``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.opened: list[str] = []
        self.listed: list[str] = []
        real_open, real_scandir, real_listdir = builtins.open, os.scandir, os.listdir

        def counted_open(file, *a, **k):
            self.opened.append(str(file))
            return real_open(file, *a, **k)

        def counted_scandir(path="."):
            self.listed.append(str(path))
            return real_scandir(path)

        def counted_listdir(path="."):
            self.listed.append(str(path))
            return real_listdir(path)

        monkeypatch.setattr(builtins, "open", counted_open)
        monkeypatch.setattr(io, "open", counted_open)
        monkeypatch.setattr(os, "scandir", counted_scandir)
        monkeypatch.setattr(os, "listdir", counted_listdir)


def test_plan_of_a_cached_set_reads_no_image_or_caption_and_lists_no_cache_folder(tmp_path, tiny_dev_dir, monkeypatch):
    data_dir = write_data(tmp_path / "data")
    _age(data_dir)  # written a minute ago, as a real dataset is (a file changed just now is always read)
    cache = tmp_path / "cache"
    _, data, plan = setup_run(data_dir, tiny_dev_dir, cache, flip=True)
    fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False)
    _age(cache)
    setup_run(data_dir, tiny_dev_dir, cache, flip=True)  # a later run verifies the entries once more

    monkeypatch.setattr(cache_module, "_VERIFIED", {})  # a new process: nothing remembered in memory
    verified: list[str] = []
    real_read = cache_module.read_entry
    monkeypatch.setattr(cache_module, "read_entry", lambda p: verified.append(str(p)) or real_read(p))
    seen = Opens(monkeypatch)
    _, data2, plan2 = setup_run(data_dir, tiny_dev_dir, cache, flip=True)
    assert plan2.complete and [r.image_hash for r in data2.records] == [r.image_hash for r in data.records]
    assert [(r.width, r.height) for r in data2.records] == [(r.width, r.height) for r in data.records]
    data_files = [p for p in seen.opened if Path(p).suffix in (".png", ".txt")]
    assert data_files == []  # hashes, sizes and captions come from the scan's record, by each file's stat
    assert verified == []  # entries verified by an earlier process are trusted by their stat
    assert not [p for p in seen.listed if Path(p).resolve().is_relative_to(cache.resolve())]
    assert fill_cache(plan2, data2, forbidden, forbidden, progress=False).texts == 0


def test_a_changed_image_is_read_again(tmp_path, tiny_dev_dir, monkeypatch):
    from PIL import Image

    data_dir = write_data(tmp_path / "data")
    _age(data_dir)
    cache = tmp_path / "cache"
    setup_run(data_dir, tiny_dev_dir, cache)
    Image.new("RGB", (80, 48), (9, 9, 9)).save(data_dir / "img1.png")  # new size, new bytes, mtime now
    seen = Opens(monkeypatch)
    _, data, _ = setup_run(data_dir, tiny_dev_dir, cache)
    assert [Path(p).name for p in seen.opened if p.endswith(".png")] == ["img1.png"]
    assert (data.records[1].width, data.records[1].height) == (80, 48)


def test_entries_a_fill_wrote_are_not_read_back(tmp_path, tiny_dev_dir, monkeypatch):
    """The fill checksummed the bytes it wrote: it records each entry's stamp, so the plan after it (in the same
    process, or a later one reading verified.json) reads none of them back."""
    data_dir = write_data(tmp_path / "data")
    _age(data_dir)
    cache = tmp_path / "cache"
    _, data, plan = setup_run(data_dir, tiny_dev_dir, cache, flip=True)
    monkeypatch.setattr(cache_module, "RACY_NS", 0)  # this test writes and plans within the same 2 s
    fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False)
    verified: list[str] = []
    real_read = cache_module.read_entry
    monkeypatch.setattr(cache_module, "read_entry", lambda p: verified.append(str(p)) or real_read(p))
    assert plan.refresh().complete and verified == []
    monkeypatch.setattr(cache_module, "_VERIFIED", {})  # a new process: what verified.json holds
    assert plan.refresh().complete and verified == []
