"""An image folder with a metadata file: images the file does not list are named in a warning, not dropped
without a word."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flux_lora.config import DataConfig
from flux_lora.data.scan import scan

from helpers.cache import write_image


def test_images_missing_from_the_metadata_file_are_named(tmp_path, caplog):
    root = tmp_path / "data"
    rows = [{"file_name": f"p{i}.png", "text": f"caption {i}"} for i in range(2)]
    for row in rows:
        write_image(root / row["file_name"], (64, 64))
    write_image(root / "forgotten.png", (64, 64))
    write_image(root / "sub" / "also_forgotten.jpg", (64, 64))
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="flux_lora.data.scan"):
        data = scan(DataConfig(source=str(root), resolution=64, cache_dir=str(tmp_path / "cache")))
    assert sorted(Path(r.path).name for r in data.records) == ["p0.png", "p1.png"]
    warned = [r.getMessage() for r in caplog.records if "not listed" in r.getMessage()]
    assert len(warned) == 1
    assert "forgotten.png" in warned[0] and "also_forgotten.jpg" in warned[0] and "metadata.jsonl" in warned[0]
