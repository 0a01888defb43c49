"""Helpers of the cache and data-module tests and of the processes they spawn (kept free of Lightning to start
fast)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from flux_lora.config import DataConfig
from flux_lora.data.cache import AutoEncoderSpec, CachePlan, TextEncoderSpec, fill_cache, plan_cache
from flux_lora.data.scan import ScannedData, scan
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.text_encoders import TextEncoders
from flux_lora.weights.loading import load_autoencoder

MAX_LENGTH = 32  # the tiny preset's T5 length
DTYPE = torch.float32
CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def write_data(root: Path) -> Path:
    """Three captioned images in three aspect ratios."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    for i, (size, caption) in enumerate(zip([(64, 64), (96, 64), (64, 96)], CAPTIONS, strict=True)):
        image = Image.new("RGB", size, (30 * i, 120, 200))
        ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(250, 40 * i, 0))
        image.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(caption)
    return root


class Loaders:
    """Encoder loaders that count loads and encoded items, optionally failing after ``fail_after`` encode
    calls."""

    def __init__(self, folder: Path, fail_after: int | None = None):
        self.folder, self.fail_after = folder, fail_after
        self.loads, self.encoded, self.calls = Counter(), Counter(), 0

    def _count(self, kind: str, n: int) -> None:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.encoded[kind] += n

    def text(self) -> TextEncoders:
        self.loads["text"] += 1
        te = TextEncoders.from_folder(self.folder, MAX_LENGTH, dtype=DTYPE)
        encode = te.encode

        def counted(prompts):
            self._count("text", len(prompts))
            return encode(prompts)

        te.encode = counted
        return te

    def ae(self) -> AutoEncoder:
        self.loads["ae"] += 1
        ae = load_autoencoder(self.folder, dtype=DTYPE)
        encode = ae.encode

        def counted(x):
            self._count("ae", x.shape[0])
            return encode(x)

        ae.encode = counted
        return ae


def forbidden():
    raise AssertionError("an encoder was loaded although the cache is complete")


def setup_run(
    data_dir: Path, model: Path, cache: Path, prompts=("a cat",), **kw
) -> tuple[DataConfig, ScannedData, CachePlan]:
    """Scan ``data_dir`` and plan the cache for the tiny model in ``model``."""
    cfg = DataConfig(source=str(data_dir), resolution=64, cache_dir=str(cache), **kw)
    data = scan(cfg)
    text_spec = TextEncoderSpec.from_folder(model, MAX_LENGTH, DTYPE)
    ae_spec = AutoEncoderSpec.from_folder(model, DTYPE)
    return cfg, data, plan_cache(data, cfg, text_spec, ae_spec, list(prompts))


def fill_worker(data_dir: str, model: str, cache: str, barrier, results) -> None:
    """Body of a spawned process: plan, wait for the other process, fill, report what it encoded."""
    torch.set_num_threads(1)
    loaders = Loaders(Path(model))
    _, data, plan = setup_run(Path(data_dir), Path(model), Path(cache), flip=True)
    barrier.wait()
    fill_cache(plan, data, loaders.text, loaders.ae, batch_size=1, progress=False)
    results.put(dict(loaders.encoded))


def write_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    """A plain RGB image of ``size`` at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path
