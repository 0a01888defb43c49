"""Streaming sources (data.streaming): WebDataset tar shards read by `datasets` as the run starts, encoded into
the cache as they stream in, then trained from the cache like the same images in a folder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from flux_lora.config import DataError
from flux_lora.data import stream
from flux_lora.data.scan import scan_all
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.training.run import run

from helpers.training import tiny_config

SIZES = [(64, 64), (96, 64), (64, 96), (64, 64), (80, 48), (48, 80)]


def _jpeg(i: int, size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size, (40 * i, 120, 200 - 30 * i))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(250, 30 * i, 0))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _write(root: Path) -> tuple[Path, Path]:
    """The same six captioned JPEGs as two WebDataset shards (tarfile) and as a plain folder."""
    shards, folder = root / "shards", root / "folder"
    shards.mkdir(parents=True)
    folder.mkdir(parents=True)
    for s in range(2):
        with tarfile.open(shards / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(3 * s, 3 * s + 3):
                members = {f"{i:06d}.jpg": _jpeg(i, SIZES[i]), f"{i:06d}.txt": f"shape number {i}".encode()}
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                    (folder / name).write_bytes(payload)
    return shards, folder


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_webdataset_shards_train_as_the_same_images_in_a_folder(tmp_path, tiny_dev_dir, monkeypatch):
    shards, folder = _write(tmp_path / "data")
    encoded: list[int] = []
    real_encode = AutoEncoder.encode
    monkeypatch.setattr(AutoEncoder, "encode", lambda self, x: encoded.append(x.shape[0]) or real_encode(self, x))
    steps = ("--max_steps=3", "--train.save_every_n_steps=0", "--train.checkpoint_every_n_steps=0")
    streamed = tiny_config(
        tmp_path / "stream",
        tiny_dev_dir,
        f"--data.source={shards}/shard-*.tar",
        "--data.streaming=true",
        "--data.image_column=jpg",
        "--data.caption_column=txt",
        *steps,
    )
    with pytest.raises(DataError, match="has not been read into the cache"):
        scan_all(streamed.data)  # the scan alone never streams (no model to encode with)
    lora = run(streamed)
    assert lora is not None and lora.is_file()
    assert sum(encoded) == 6  # every image of the stream encoded once, as it arrived
    scanned = scan_all(streamed.data)
    assert [r.caption for r in scanned.records] == [f"shape number {i}" for i in range(6)]

    # a rerun trains from the cache: the stream is not opened again and nothing is encoded
    monkeypatch.setattr(stream, "open_stream", lambda cfg: pytest.fail("streamed again"))
    assert stream.stream_into_cache(streamed.data, None, None, None, None) == (0, 0)  # type: ignore[arg-type]

    plain = tiny_config(tmp_path / "folder", tiny_dev_dir, f"--data.source={folder}", *steps)
    folder_lora = run(plain)
    assert folder_lora is not None
    got, want = _tensors(lora), _tensors(folder_lora)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
