"""Streaming sources (data.streaming): WebDataset tar shards read by `datasets` as the run starts, encoded into
the cache as they stream in, then trained from the cache like the same images in a folder."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
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

ROOT = Path(__file__).parents[1]
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


def test_two_processes_each_stream_and_encode_half_then_train_from_the_merged_record(tmp_path, tiny_dev_dir):
    """torchrun starts 2 processes on 2 WebDataset shards: each reads one shard (split_dataset_by_node) and encodes
    only its images, records its part; rank 0 merges the parts and both train (DDP, gloo) from the cache, encoding
    nothing more."""
    shards, _ = _write(tmp_path / "data")
    out = tmp_path / "records"
    out.mkdir()
    stale = tmp_path / "cache" / "streams"
    stale.mkdir(parents=True)
    (stale / "stream-0ld.failed1").touch()  # a failure marker of an earlier launch: another token, ignored
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        str(ROOT / "tests/stream_ddp_worker.py"),
        str(out),
        f"--model.source={tiny_dev_dir}",
        f"--output_dir={tmp_path / 'run'}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--data.source={shards}/shard-*.tar",
        "--data.streaming=true",
        "--data.image_column=jpg",
        "--data.caption_column=txt",
        "--data.batch_size=1",
        "--sample.prompts=[]",
        "--train.accelerator=cpu",
        "--train.devices=2",
        "--train.strategy=ddp",
        "--max_steps=2",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in records:
        assert r["read"] == [[3, 3]]  # one shard of 3 images read, its 3 latents encoded
        assert r["encoded"]["images"] == 3  # and no other image, neither while streaming nor in the fit
        assert r["encoded"]["captions"] in (3, 4)  # its captions (and the empty caption, by one or both)
    assert records[0]["lora"] and Path(records[0]["lora"]).is_file() and records[1]["lora"] is None
    streamed = tiny_config(
        tmp_path,
        tiny_dev_dir,
        f"--data.source={shards}/shard-*.tar",
        "--data.streaming=true",
        "--data.image_column=jpg",
        "--data.caption_column=txt",
    )
    assert sorted(r.caption for r in scan_all(streamed.data).records) == [f"shape number {i}" for i in range(6)]
    assert [p.name for p in stale.iterdir() if ".part" in p.name] == []  # parts merged, then removed
    assert "2 parts merged, 6 images" in proc.stderr


def test_a_rank_that_failed_to_stream_stops_the_others(tmp_path, tiny_dev_dir):
    cfg = tiny_config(tmp_path, tiny_dev_dir, f"--data.source={tmp_path}/shard-*.tar", "--data.streaming=true")
    stream._write_record(stream.part_path(cfg.data, 0, 2), [], [])
    token = stream._launch_token()
    stream.manifest_path(cfg.data).with_name(f"{token}.failed1").touch()
    with pytest.raises(RuntimeError, match="rank 1 failed while streaming"):
        stream._merge_parts(cfg.data, 0, 2, token)
    assert stream.read_manifest(cfg.data) is None  # nothing merged
