"""Training data: the config, and the scan that reads captions and checks images before any model loads.

Sources (``DataConfig.source``), tried in this order:

1. a folder written by ``datasets``' ``save_to_disk`` (it holds ``state.json`` or ``dataset_dict.json``);
2. a folder with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + caption column), read by
   ``datasets``' ``imagefolder`` loader;
3. any other folder: images found recursively (hidden folders skipped), each captioned by the text file
   beside it with the same stem and ``caption_extension``;
4. anything else is passed to ``datasets.load_dataset`` (a hub name or a local dataset path).

In an image folder, kohya's DreamBooth layout is honoured: images under a subfolder named ``N_name`` (``10_sks
dog/``) are repeated ``N`` times (times ``repeats``), and an image there without a caption file is captioned
``name``. Every caption then gets the dataset's ``trigger_word`` (:func:`apply_trigger`). Several datasets
(``data.datasets``) are scanned one by one and joined by :func:`scan_all`.

An image that cannot be decoded is skipped with a warning naming it, and the count is logged at the end. An
empty dataset, a missing caption (an absent or blank caption, unless ``default_caption`` is set) and a missing
column raise :class:`DataError`. The scan decodes each image once to find its size (after EXIF rotation) and
remembers the result in ``<cache_dir>/probe/`` keyed by the file's sha256; in an image folder each file's
hash and size are also remembered by its ``stat`` (:class:`ScanIndex`), so a later scan of an unchanged folder
lists it once and opens no image (100,000 images: see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from flux_lora.atomic import write_text_atomic
from flux_lora.config import DataConfig, DataError
from flux_lora.names import SIDE_MULTIPLE

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TRIGGER = "[trigger]"
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's DreamBooth subfolders: <repeats>_<class caption>
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One usable training image: its caption, content hash and size after EXIF rotation. ``path`` is the file
    to read; for a ``datasets`` source holding the bytes, ``row`` is its row instead."""

    name: str
    caption: str
    image_hash: str
    width: int
    height: int
    path: str | None = None
    row: int | None = None
    repeats: int = 1  # times per epoch: the dataset's repeats times a kohya folder's N
    part: int = 0  # which dataset of data.datasets it belongs to
    loss_weight: float = 1.0  # its dataset's data.loss_weight


@dataclass
class ScannedData:
    """What :func:`scan` found: usable records, skipped images (name, reason), and a way to read images.
    Several datasets joined by :func:`scan_all` keep their own scans in ``parts`` (``record.part`` indexes it)."""

    source: str
    records: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dataset: Any = None  # the datasets.Dataset holding the rows, for sources that embed image bytes
    image_column: str = "image"
    parts: list[ScannedData] = field(default_factory=list)

    def read_bytes(self, record: ImageRecord) -> bytes:
        """The image file's bytes; raises :class:`DataError` when they changed since the scan."""
        if self.parts:
            return self.parts[record.part].read_bytes(record)
        if record.row is not None:
            data = _row_bytes(self.dataset[record.row][self.image_column], record.name)
        elif record.path is not None:
            data = Path(record.path).read_bytes()
        else:
            raise DataError(
                f"{record.name} has neither a file nor a dataset row to read (a streamed image is only cached)"
            )
        if hashlib.sha256(data).hexdigest() != record.image_hash:
            raise DataError(f"{record.name} changed since the data was scanned; start again")
        return data

    def read_image(self, record: ImageRecord) -> Image.Image:
        """The decoded image, EXIF-rotated, as RGB (transparency composited on white)."""
        return to_rgb(decode(self.read_bytes(record)))


def decode(data: bytes) -> Image.Image:
    """Decode fully (so truncated files fail here) and apply the EXIF orientation."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------ probing images


_BUFFER = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _named(text: str, name: str) -> str:
    """Pillow's messages name the in-memory buffer it read (``<_io.BytesIO object at 0x...>``): name the file."""
    return _BUFFER.sub(Path(name).name or "the image", text)


def _probe(data: bytes, digest: str, probe_dir: Path | None, name: str = "") -> tuple[int, int] | str:
    """``(width, height)`` after EXIF rotation, or the reason the image cannot be read (naming ``name``);
    remembered by hash. Warnings pillow raises while decoding are logged with the image's ``name``."""
    memo = probe_dir / digest[:2] / f"{digest}.json" if probe_dir else None
    if memo is not None and memo.is_file():
        try:
            found = json.loads(memo.read_text())
            return _named(found["error"], name) if found.get("error") else (found["width"], found["height"])
        except (ValueError, KeyError):
            pass  # a damaged memo: probe again and overwrite it
    result: tuple[int, int] | str
    if not data:
        result = "the file is empty, 0 bytes"
    else:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with decode(data) as image:
                    size: tuple[int, int] = image.size
            for w in caught:
                log.warning("%s: %s", name, _BUFFER.sub("the image", str(w.message)))
            result = size if min(size) >= SIDE_MULTIPLE else f"smaller than {SIDE_MULTIPLE} px ({size[0]}x{size[1]})"
        except Exception as e:  # PIL raises many types for corrupt data
            result = f"{type(e).__name__}: {e}"
    if memo is not None:
        entry = {"error": result} if isinstance(result, str) else {"width": result[0], "height": result[1]}
        write_text_atomic(memo, json.dumps(entry))
    return _named(result, name) if isinstance(result, str) else result


RACY_NS = 2_000_000_000  # a file modified this close to a scan is read again by the next one (git's "racily clean")


class ScanIndex:
    """What earlier scans of one image folder found per file (an image's sha256 and size after EXIF rotation, a
    caption file's text), kept in ``<cache>/probe/folder-<hash of the folder's path>.json`` and trusted while the
    file's ``stat`` (size, mtime, ctime, inode) is unchanged, so a scan of an unchanged folder opens no image and
    no caption file. A file is recorded only when it was last modified more than :data:`RACY_NS` before the scan
    began (a change within the same timestamp tick could not be told apart); an image's bytes are checked against
    the hash again whenever they are read to be encoded (:meth:`ScannedData.read_bytes`)."""

    VERSION = 1

    def __init__(self, probe_dir: Path, folder: Path):
        key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
        self.path = probe_dir / f"folder-{key}.json"
        self.started = time.time_ns()
        self.old: dict[str, list[Any]] = {}
        self.new: dict[str, list[Any]] = {}
        self.old_captions: dict[str, list[Any]] = {}
        self.new_captions: dict[str, list[Any]] = {}
        try:
            found = json.loads(self.path.read_text())
            if found.get("version") == self.VERSION:
                self.old, self.old_captions = found["files"], found.get("captions", {})
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # none yet, or damaged: every file is read once more

    @staticmethod
    def stamp(path: str) -> list[int]:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def known(self, path: str, stamp: list[int]) -> tuple[str, tuple[int, int]] | None:
        """``(sha256, (width, height))`` recorded for ``path`` at this ``stamp``, else None."""
        row = self.old.get(path)
        if row is None or row[:4] != stamp:
            return None
        self.new[path] = row
        return row[4], (row[5], row[6])

    def record(self, path: str, stamp: list[int], digest: str, size: tuple[int, int]) -> None:
        if stamp[1] + RACY_NS <= self.started:
            self.new[path] = [*stamp, digest, size[0], size[1]]

    def caption(self, path: str) -> str | None:
        """The text of the caption file ``path``: as recorded at its stamp, else read (and recorded)."""
        stamp = self.stamp(path)
        row = self.old_captions.get(path)
        if row is not None and row[:4] == stamp:
            self.new_captions[path] = row
            return str(row[4])
        text = _read_caption(Path(path))
        if text is not None and stamp[1] + RACY_NS <= self.started:
            self.new_captions[path] = [*stamp, text]
        return text

    def save(self) -> None:
        """Write what this scan found (files gone since are dropped), when it differs from what was there."""
        if self.new != self.old or self.new_captions != self.old_captions:
            found = {"version": self.VERSION, "files": self.new, "captions": self.new_captions}
            write_text_atomic(self.path, json.dumps(found))


def _row_bytes(value: Any, name: str) -> bytes:
    """Bytes of a ``datasets`` image cell read with ``Image(decode=False)`` (or of a plain path string)."""
    if isinstance(value, str):
        return Path(value).read_bytes()
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
    raise DataError(f"{name}: the image cell holds neither bytes nor a path ({type(value).__name__})")


# ------------------------------------------------------------------------------------------ sources


def apply_trigger(text: str, trigger: str | None, where: str) -> str:
    """``[trigger]`` in ``text`` replaced by ``trigger``; else ``"trigger, text"`` unless ``text`` already holds
    it. ``where`` names the caption or prompt in the error raised for ``[trigger]`` without a trigger word."""
    if not trigger:
        if TRIGGER in text:
            raise DataError(f"{where} uses {TRIGGER} but data.trigger_word is not set")
        return text
    if TRIGGER in text:
        return text.replace(TRIGGER, trigger)
    if trigger in text:
        return text
    return f"{trigger}, {text}" if text else trigger


def kohya_folder(folder: Path, path: Path) -> tuple[int, str | None]:
    """``(repeats, class caption)`` of an image under a kohya ``N_name`` subfolder of ``folder``, else
    ``(1, None)``."""
    return _kohya_parts(path.relative_to(folder).parts)


def _kohya_parts(parts: Sequence[str]) -> tuple[int, str | None]:
    match = KOHYA_FOLDER.match(parts[0]) if len(parts) > 1 else None
    return (int(match.group(1)), match.group(2).strip()) if match and int(match.group(1)) > 0 else (1, None)


FolderItem = tuple[str, str | None, str, int, str | None]


def _walk(folder: Path, skip: list[Path]) -> Iterator[tuple[tuple[str, ...], str, os.DirEntry[str]]]:
    """``(relative parts, path, entry)`` of every file under ``folder``, hidden files and folders and the
    ``skip`` folders left out, symlinked folders not followed (as ``Path.rglob``). One ``scandir`` per folder
    and no ``stat`` per file: a folder of 100,000 images is listed in well under a second."""
    base = str(folder)
    pending: list[tuple[tuple[str, ...], str]] = [((), "" if base == "." else base.rstrip(os.sep) + os.sep)]
    while pending:
        rel, prefix = pending.pop()
        with os.scandir(prefix or ".") as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = prefix + entry.name  # as str(Path(folder, *rel, name)), without building a Path
                if entry.is_dir(follow_symlinks=False):
                    resolved = Path(path).resolve()
                    if not any(s == resolved or s in resolved.parents for s in skip):
                        pending.append(((*rel, entry.name), path + os.sep))
                elif entry.is_file():
                    if entry.is_symlink():  # a link to a file in a skipped folder (the cache) is skipped too
                        resolved = Path(path).resolve()
                        if any(s == resolved or s in resolved.parents for s in skip):
                            continue
                    yield (*rel, entry.name), path, entry


def _folder_items(
    folder: Path, cfg: DataConfig, exclude: Sequence[Path] = (), index: ScanIndex | None = None
) -> list[FolderItem]:
    """``(name, caption or None, path, kohya repeats, kohya class caption)`` per image in ``folder`` (hidden
    folders, the cache and ``exclude``d folders left out), in path order. Files pillow could read in other
    formats, and captions without an image, are named in a warning."""
    skip = [cfg.cache_path.resolve(), *(Path(e).resolve() for e in exclude)]
    inside = folder.resolve()
    skip = [s for s in skip if not (s == inside or s in inside.parents)]  # a folder in the cache: generated images
    files = sorted(_walk(folder, skip), key=lambda f: f[0])
    present = {path for _, path, _ in files}
    items: list[FolderItem] = []
    other_images: list[str] = []
    captions: list[str] = []
    pillow = _pillow_extensions()
    for parts, path, _ in files:
        stem, suffix = os.path.splitext(path)
        suffix = suffix.lower()
        if suffix == cfg.caption_extension:
            captions.append(path)
        if suffix not in IMAGE_EXTENSIONS:
            if suffix in pillow and suffix != cfg.caption_extension:
                other_images.append(path)
            continue
        caption_file = stem + cfg.caption_extension
        caption = None
        if caption_file in present:
            caption = index.caption(caption_file) if index is not None else _read_caption(Path(caption_file))
        items.append((path, caption, path, *_kohya_parts(parts)))
    _log_kohya_folders(folder, items)
    images = [item[2] for item in items] + other_images
    _warn_unused(folder, other_images, captions, {os.path.splitext(p)[0] for p in images})
    return items


def _read_caption(caption_file: Path) -> str | None:
    if not caption_file.is_file():
        return None
    try:
        return caption_file.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the caption
    except UnicodeDecodeError as e:
        raise DataError(f"caption file {caption_file} is not UTF-8 text ({e})") from None


def _pillow_extensions() -> set[str]:
    """File suffixes pillow can open (not only write)."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _warn_unused(folder: Path, other_images: list[str], captions: list[str], image_stems: set[str]) -> None:
    if other_images:
        log.warning(
            "not used as training images (format not in %s): %d files in %s, e.g. %s",
            ", ".join(IMAGE_EXTENSIONS),
            len(other_images),
            folder,
            ", ".join(other_images[:5]),
        )
    orphans = [c for c in captions if os.path.splitext(c)[0] not in image_stems]
    if orphans:
        log.warning(
            "%d caption files in %s have no image beside them: %s", len(orphans), folder, ", ".join(orphans[:5])
        )


def _log_kohya_folders(folder: Path, items: list[FolderItem]) -> None:
    counts: dict[str, list[int]] = {}
    start = len(str(folder).rstrip(os.sep)) + 1
    for name, _, _, repeats, _ in items:
        top = name[start:].split(os.sep, 1)[0] if os.sep in name[start:] else ""
        if top and (repeats > 1 or KOHYA_FOLDER.match(top)):
            counts.setdefault(top, [repeats, 0])[1] += 1
    for sub, (repeats, n) in sorted(counts.items()):
        log.info("kohya folder %s/%s: %d images x %d repeats", folder, sub, n, repeats)


def _warn_unlisted(folder: Path, listed: list[str | None], exclude: Sequence[Path]) -> None:
    """Name the images in an image folder that its metadata file does not list (they are not trained on)."""
    known = {Path(p).resolve() for p in listed if p}
    skip = [Path(e).resolve() for e in exclude]
    unlisted = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.resolve() not in known
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not any(p.resolve().is_relative_to(s) for s in skip)
    )
    if unlisted:
        metadata = next(m for m in METADATA_FILES if (folder / m).is_file())
        more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
        log.warning(
            "%d images in %s are not listed in %s and are not trained on: %s%s",
            len(unlisted),
            folder,
            metadata,
            ", ".join(unlisted[:5]),
            more,
        )


def _load_datasets_source(cfg: DataConfig) -> Any:
    import datasets

    source = Path(cfg.source)
    hf_cache = str(cfg.cache_path / "hf-datasets")
    try:
        if source.is_dir() and any((source / m).is_file() for m in SAVED_DATASET_MARKERS):
            ds = datasets.load_from_disk(str(source))
        elif source.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(source), split=cfg.split, cache_dir=hf_cache)
        else:
            ds = datasets.load_dataset(cfg.source, split=cfg.split, cache_dir=hf_cache)
    except Exception as e:
        raise DataError(f"data.source {cfg.source!r} could not be read as a dataset ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"data.split {cfg.split!r} is not in {cfg.source}; splits: {sorted(ds)}")
        ds = ds[cfg.split]
    return ds


def _dataset_items(ds: Any, cfg: DataConfig) -> tuple[Any, list[tuple[str, str | None, Any, int, str | None]]]:
    import datasets

    for role, column in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
        if column not in ds.column_names:
            raise DataError(
                f"column {column!r} (data.{role}) is not in dataset {cfg.source}; available columns: {ds.column_names}"
            )
    ds = ds.select_columns([cfg.image_column, cfg.caption_column])
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    items: list[tuple[str, str | None, Any, int, str | None]] = []
    for row, example in enumerate(ds):
        cell = example[cfg.image_column]
        path = cell if isinstance(cell, str) else (cell or {}).get("path")
        name = f"{cfg.source}[{row}]" + (f" ({path})" if path else "")
        items.append((name, example[cfg.caption_column], cell, 1, None))
    return ds, items


def source_kind(source: str) -> str:
    """``saved`` (save_to_disk), ``imagefolder`` (metadata file), ``folder`` (images + captions), ``hub``."""
    path = Path(source)
    if path.is_dir():
        if any((path / m).is_file() for m in SAVED_DATASET_MARKERS):
            return "saved"
        return "imagefolder" if any((path / m).is_file() for m in METADATA_FILES) else "folder"
    return "hub"


def final_caption(cfg: DataConfig, caption: Any, class_caption: str | None, name: str) -> str | None:
    """The caption trained on: stripped, else the kohya class caption, else ``data.default_caption``, then the
    trigger word; None when there is none."""
    text = (caption.strip() if isinstance(caption, str) else None) or class_caption
    if not text:
        if cfg.default_caption is None:
            return None
        text = cfg.default_caption
    return apply_trigger(text, cfg.trigger_word, f"the caption of {name}")


def scan(cfg: DataConfig, exclude: Sequence[Path] = ()) -> ScannedData:
    """Read every caption and check every image of ``cfg.source``; needs no model. Folders in ``exclude`` (the
    run's output folder, when it lies inside the data) are not scanned.

    Raises:
        DataError: empty or unreadable source, missing column, missing captions (all named), no usable image.
    """
    if not cfg.source:
        raise DataError("data.source is empty: set it to an image folder or a dataset")
    if cfg.streaming:
        return scan_stream(cfg)
    kind = source_kind(cfg.source)
    if kind == "hub" and (Path(cfg.source).exists() or cfg.source.startswith(("/", ".", "~"))):
        raise DataError(f"data.source {cfg.source} is not a folder (an image folder or a dataset folder)")
    dataset, index = None, None
    if kind == "folder":
        index = ScanIndex(cfg.cache_path / "probe", Path(cfg.source))
        items = _folder_items(Path(cfg.source), cfg, exclude, index)
    else:
        dataset, items = _dataset_items(_load_datasets_source(cfg), cfg)
        if kind == "imagefolder":
            _warn_unlisted(Path(cfg.source), [_cell_path(ref) for _, _, ref, _, _ in items], exclude)
    probe_dir = cfg.cache_path / "probe"
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []
    probed: tuple[int, int] | str
    for row, (name, caption, ref, kohya_repeats, class_caption) in enumerate(items):
        try:
            stamp = ScanIndex.stamp(ref) if index is not None else []  # before reading: a change later shows
            known = index.known(ref, stamp) if index is not None else None
            data = b"" if known else Path(ref).read_bytes() if kind == "folder" else _row_bytes(ref, name)
        except (OSError, DataError) as e:  # unreadable file, or a row without image data
            digest, probed = "", f"{type(e).__name__}: {e}"
        else:
            if known:
                digest, probed = known
            else:
                digest = hashlib.sha256(data).hexdigest()
                probed = _probe(data, digest, probe_dir, name)
                if index is not None and not isinstance(probed, str):
                    index.record(ref, stamp, digest, probed)
        if isinstance(probed, str):
            log.warning("skipping %s: the image cannot be read (%s)", name, probed)
            skipped.append((name, probed))
            continue
        caption = final_caption(cfg, caption, class_caption, name)
        if caption is None:
            missing.append(name)
            continue
        path = ref if kind == "folder" else _cell_path(ref)
        records.append(
            ImageRecord(
                name,
                caption,
                digest,
                probed[0],
                probed[1],
                path=path,
                row=None if path else row,
                repeats=cfg.repeats * kohya_repeats,
                loss_weight=cfg.loss_weight,
            )
        )
    if index is not None:
        index.save()
    check_scan(cfg, records, skipped, missing, len(items))
    return ScannedData(cfg.source, records, skipped, dataset, cfg.image_column)


# ------------------------------------------------------------------------------------------ streamed sources

MANIFEST_VERSION = 1


def manifest_path(cfg: DataConfig) -> Path:
    """Where what the stream of ``cfg`` held is recorded, keyed by what selects the examples."""
    ident = json.dumps([cfg.source, cfg.split, cfg.image_column, cfg.caption_column])
    return cfg.cache_path / "streams" / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.json"


def read_manifest(cfg: DataConfig) -> dict[str, Any] | None:
    """The record of a complete pass over the stream of ``cfg``, or None."""
    try:
        found = json.loads(manifest_path(cfg).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(found, dict) and found.get("version") == MANIFEST_VERSION and found.get("complete")
    return found if ok else None


def scan_stream(cfg: DataConfig) -> ScannedData:
    """The scan of a streamed source, from its manifest (no network, no image read). Its records have no file
    or row: their latents are in the cache.

    Raises:
        DataError: the source was not streamed into the cache yet, or a caption is missing.
    """
    found = read_manifest(cfg)
    if found is None:
        raise DataError(
            f"data.source {cfg.source} is streamed (data.streaming) but has not been read into the cache "
            f"{cfg.cache_path} yet: train with train.py, which streams it first (flux_lora.data.stream)"
        )
    records, missing = [], []
    for name, caption, digest, width, height in found["images"]:
        text = final_caption(cfg, caption, None, name)
        if text is None:
            missing.append(name)
            continue
        records.append(ImageRecord(name, text, digest, width, height, repeats=cfg.repeats, loss_weight=cfg.loss_weight))
    skipped = [(name, reason) for name, reason in found["skipped"]]
    check_scan(cfg, records, skipped, missing, len(found["images"]) + len(skipped))
    return ScannedData(cfg.source, records, skipped)


def scan_all(cfg: DataConfig, exclude: Sequence[Path] = ()) -> ScannedData:
    """:func:`scan` of every dataset of ``cfg`` (``data.datasets``, or the single one), joined; each record's
    ``part`` says which dataset it came from."""
    for i, d in enumerate(cfg.datasets):
        if d.generate is not None:
            raise DataError(
                f"data.datasets[{i}] generates its images: make them first "
                "(flux_lora.training.regularization.prepare_regularization)"
            )
    configs = cfg.dataset_configs()
    if len(configs) == 1:
        return scan(configs[0], exclude)
    parts = [scan(c, exclude) for c in configs]
    records = [replace(r, part=i) for i, p in enumerate(parts) for r in p.records]
    skipped = [s for p in parts for s in p.skipped]
    return ScannedData(" + ".join(c.source for c in configs), records, skipped, parts=parts)


def _cell_path(cell: Any) -> str | None:
    """The file to read a ``datasets`` image from again, when the row names one instead of embedding it."""
    if isinstance(cell, str):
        return cell
    return cell.get("path") if isinstance(cell, dict) and not cell.get("bytes") else None


def check_scan(
    cfg: DataConfig, records: list[ImageRecord], skipped: list[tuple[str, str]], missing: list[str], total: int
) -> None:
    if missing:
        where = (
            f"a {cfg.caption_extension} file beside each image"
            if source_kind(cfg.source) == "folder"
            else f"column {cfg.caption_column!r}"
        )
        raise DataError(
            f"{len(missing)} image(s) in {cfg.source} have no caption ({where}), e.g. {missing[:5]}; "
            "add captions or set data.default_caption"
        )
    if skipped:
        log.warning("skipped %d of %d images in %s that could not be read", len(skipped), total, cfg.source)
    if not records:
        raise DataError(f"no usable image in {cfg.source} ({total} found, {len(skipped)} unreadable)")
    log.info("scanned %s: %d images", cfg.source, len(records))
