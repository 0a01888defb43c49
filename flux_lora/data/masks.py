"""Loss masks: which parts of each training image count, from its alpha channel or from a mask folder.

``data.masks: alpha`` takes the image's alpha channel (opaque: trained, transparent: ignored); a folder holds one
greyscale mask per image under the image's file name (or its stem with ``.png``), white trained, black ignored.
A mask is placed exactly as its image (resize, crop, mirror), reduced to the latent grid by area averaging and
cached in the image's latent entry; its content is part of the entry's key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from flux_lora.config import DataError
from flux_lora.data.buckets import Crop, apply_crop
from flux_lora.data.scan import ImageRecord, ScannedData, decode

ALPHA = "alpha"


def mask_file(source: str, record: ImageRecord) -> Path:
    """The mask of ``record`` in the folder ``source``: the image's file name, else its stem with ``.png``."""
    folder = Path(source)
    name = Path(Path(record.name).name)  # a folder source names records by their path
    candidates = dict.fromkeys([folder / name, folder / name.with_suffix(".png")])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    expected = " or ".join(c.name for c in candidates)
    raise DataError(f"data.masks: no mask for {record.name} in {folder} (expected {expected})")


def mask_hash(source: str | None, record: ImageRecord) -> str:
    """What the cache key records of ``record``'s mask: "" without masks, "alpha" (the image hash covers it),
    or the mask file's sha256."""
    if not source:
        return ""
    if source == ALPHA:
        return ALPHA
    return hashlib.sha256(mask_file(source, record).read_bytes()).hexdigest()


def read_mask(source: str, data: ScannedData, record: ImageRecord) -> Image.Image:
    """The mask of ``record`` as an 8-bit greyscale image of the image's size (an image without alpha: all 255)."""
    if source == ALPHA:
        image = decode(data.read_bytes(record))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if "A" not in image.getbands():
            return Image.new("L", image.size, 255)
        return image.getchannel("A")
    with Image.open(mask_file(source, record)) as file:
        mask = file.convert("L")
    size = (record.width, record.height)
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def latent_mask(mask: Image.Image, placement: Crop, latent_hw: tuple[int, int]) -> Tensor:
    """``mask`` placed as the image (``placement``) and area-averaged to the latent grid: ``[h, w]`` in [0, 1]."""
    placed = apply_crop(mask, placement)
    pixels = torch.from_numpy(np.asarray(placed, dtype=np.float32) / 255.0)
    return F.interpolate(pixels[None, None], size=latent_hw, mode="area")[0, 0].clamp(0, 1)
