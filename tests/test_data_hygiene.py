"""What the scan reports about a folder: BOMs, formats it does not use, orphan captions, the run's own output
folder, and images that fit their bucket poorly."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from flux_lora.config import DataConfig
from flux_lora.data.cache import AutoEncoderSpec, TextEncoderSpec, plan_cache
from flux_lora.data.scan import scan


def _image(path: Path, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


def test_folder_scan_reports_what_it_does_not_use(tmp_path, caplog):
    data = tmp_path / "data"
    _image(data / "a.png")
    (data / "a.txt").write_bytes("\ufeffa red square".encode())  # written by Notepad: a BOM first
    Image.new("RGB", (64, 64)).save(data / "anim.gif")
    (data / "anim.txt").write_text("a gif")
    (data / "lonely.txt").write_text("a caption whose image was deleted")
    _image(data / "outputs" / "samples" / "step000100-0.png")  # the run's own previews
    (data / "outputs" / "samples" / "step000100-0.txt").write_text("x")
    cfg = DataConfig(source=str(data), resolution=64, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        scanned = scan(cfg, exclude=[data / "outputs"])
    assert [r.caption for r in scanned.records] == ["a red square"]
    assert "anim.gif" in caplog.text and "not used as training images" in caplog.text
    assert "lonely.txt" in caplog.text and "no image beside them" in caplog.text
    assert "anim.txt" not in caplog.text  # its image exists (as a format not used): named once, as the image
    assert "step000100" not in caplog.text


def test_poor_bucket_fits_are_named(tmp_path, caplog):
    data = tmp_path / "data"
    _image(data / "tiny.png", (16, 16))
    _image(data / "strip.png", (640, 32))
    _image(data / "fine.png", (256, 256))
    for stem in ("tiny", "strip", "fine"):
        (data / f"{stem}.txt").write_text(stem)
    cfg = DataConfig(source=str(data), resolution=256, max_aspect=4.0, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        plan_cache(scan(cfg), cfg, TextEncoderSpec("t", 32, "float32"), AutoEncoderSpec("a", "float32"))
    assert "tiny.png (16x16: 1 tokens)" in caplog.text
    assert "strip.png (" in caplog.text and "kept)" in caplog.text
    assert "fine.png" not in caplog.text
