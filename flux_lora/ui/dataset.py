"""The Dataset page: the project's own scan of a folder (captions as the trainer uses them, kohya ``N_name``
repeats, trigger word, unreadable and tiny images), each image's aspect bucket and crop at the chosen resolutions,
caption edits written atomically beside the image, and uploads checked as images."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from flux_lora.atomic import write_atomic, write_text_atomic
from flux_lora.config import DataConfig, DataError
from flux_lora.data.buckets import bucket_sizes, choose_bucket, image_crops
from flux_lora.data.scan import IMAGE_EXTENSIONS, scan
from flux_lora.ui.paths import PathError, Roots

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
UPLOAD_NAME = re.compile(r"[^A-Za-z0-9._ -]")


@dataclass
class ImageRow:
    file: str  # relative to the data root
    caption: str  # as the trainer uses it (trigger word applied)
    repeats: int
    size: str
    buckets: str  # per resolution: bucket, crop box
    warning: str = ""


@dataclass
class ScanView:
    rows: list[ImageRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def scan_folder(
    roots: Roots, folder: str, resolutions: list[int], trigger_word: str | None = None, caption_extension: str = ".txt"
) -> ScanView:
    """Scan ``folder`` (relative to the data root) as the trainer would, with a view row per image."""
    path = roots.data_path(folder)
    if not path.is_dir():
        raise PathError(f"{folder!r} is not a folder under {roots.data}")
    cfg = DataConfig(
        source=str(path),
        trigger_word=trigger_word or None,
        default_caption="",  # list images without captions too; they are flagged below
        caption_extension=caption_extension,
        cache_dir=str(roots.output / ".ui-cache"),
    )
    collect = _Collect()
    scan_log = logging.getLogger("flux_lora.data.scan")
    scan_log.addHandler(collect)
    try:
        scanned = scan(cfg)
    except DataError as e:
        return ScanView(warnings=[str(e)])
    finally:
        scan_log.removeHandler(collect)
    view = ScanView(warnings=list(collect.lines))
    for record in scanned.records:
        image = Path(record.path or record.name)
        warning = "" if image.with_suffix(caption_extension).is_file() else f"no {caption_extension} caption file"
        cells = []
        for res in resolutions:
            bucket = choose_bucket(
                record.width,
                record.height,
                bucket_sizes(res, cfg.max_aspect),
                resolution=res,
                max_aspect=cfg.max_aspect,
                upscale=cfg.upscale,
            )
            crop = image_crops(record.width, record.height, bucket, crop=cfg.crop, variants=1, flip=False, seed="")[0]
            cells.append(
                f"{res}: {bucket[0]}x{bucket[1]} (resized {crop.resized[0]}x{crop.resized[1]}, crop {crop.box})"
            )
        view.rows.append(
            ImageRow(
                str(image.relative_to(roots.data)),
                record.caption,
                record.repeats,
                f"{record.width}x{record.height}",
                "; ".join(cells),
                warning,
            )
        )
        if warning:
            view.warnings.append(f"{image.relative_to(roots.data)}: {warning}")
    view.warnings += [f"{Path(name).name}: skipped, {reason}" for name, reason in scanned.skipped]
    return view


def caption_file(roots: Roots, image: str, caption_extension: str = ".txt") -> Path:
    """The caption file beside ``image`` (relative to the data root), checked to stay inside the data root."""
    path = roots.data_path(image)
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
        raise PathError(f"{image!r} is not an image under {roots.data}")
    return roots.data_path(path.with_suffix(caption_extension).relative_to(roots.data))


def save_caption(roots: Roots, image: str, caption: str, caption_extension: str = ".txt") -> Path:
    """Write ``caption`` to the text file beside ``image``, atomically."""
    return write_text_atomic(caption_file(roots, image, caption_extension), caption.strip() + "\n")


def read_caption(roots: Roots, image: str, caption_extension: str = ".txt") -> str:
    path = caption_file(roots, image, caption_extension)
    return path.read_text(encoding="utf-8-sig").strip() if path.is_file() else ""


def save_upload(roots: Roots, folder: str, filename: str, data: bytes, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Store an uploaded image in ``folder`` (relative to the data root) after checking it: size limit, an image
    suffix, and pillow's ``verify`` and a full decode. An existing file is never replaced."""
    name = UPLOAD_NAME.sub("_", Path(filename).name).strip(" .") or "upload"
    if len(data) > max_bytes:
        raise ValueError(f"{name}: {len(data)} bytes is over the upload limit of {max_bytes} bytes")
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{name}: not an image file name (use {', '.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as e:  # pillow raises many types for data that is not an image
        raise ValueError(f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    target = roots.data_path(Path(folder) / name)
    try:
        return write_atomic(target, lambda tmp: tmp.write_bytes(data), overwrite=False)
    except FileExistsError:
        raise ValueError(f"{target.relative_to(roots.data)} exists; rename the file to upload it") from None


def resolutions_of(text: str) -> list[int]:
    """``"512, 1024"`` -> ``[512, 1024]`` (multiples of 16, at least 16)."""
    values = [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    bad = [v for v in values if v < 16 or v % 16]
    if bad or not values:
        raise ValueError(f"resolutions {text!r}: give multiples of 16, e.g. 512, 1024")
    return values
