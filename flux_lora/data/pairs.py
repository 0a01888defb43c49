"""Paired data for FLUX.1 Kontext: each training image (the target) has a reference image, matched by file name.

Layout: ``data.source`` holds the targets with their instruction captions (``a.png`` + ``a.txt``: "make it
pink"); ``data.references`` (a sibling folder) holds a reference of the same relative name, any image extension
(``a.jpg``). A target folder with ``metadata.jsonl`` (an imagefolder: ``file_name``, ``text``) may name each
row's reference in a ``reference`` column, a file in ``data.references`` (so many targets can share one); rows
without it are matched by name. A missing or unreadable reference is a one-line
:class:`~flux_lora.config.DataError` naming the pair, raised by :func:`scan_references` before any model loads.

Cache: each reference is its own latent entry, keyed by its content and placement like every latent (see
:meth:`~flux_lora.data.cache.AutoEncoderSpec.key`), so a reference shared by many targets (or met again in a
later run) is encoded once. Placement: the bucket is chosen by the target; the reference is fitted to that same
bucket, as diffusers' ``train_dreambooth_lora_flux_kontext.py`` transforms both images of a pair alike: a
reference of the target's size takes the target's very crop (and flip), so the two stay aligned pixel for pixel;
another size is resized to cover the bucket and center-cropped (mirrored with the target).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from flux_lora.config import DataConfig, DataError
from flux_lora.data.buckets import Crop, image_crops, resized_size
from flux_lora.data.cache import AutoEncoderSpec, CachePlan, LatentJob
from flux_lora.data.scan import IMAGE_EXTENSIONS, ImageRecord, ScannedData, decode

METADATA = "metadata.jsonl"
REFERENCE_COLUMN = "reference"


def _target_file(data: ScannedData, record: ImageRecord) -> Path:
    """The target's image file: its path, or for an imagefolder row the path its image cell holds."""
    if record.path is not None:
        return Path(record.path)
    part = data.parts[record.part] if data.parts else data
    cell = part.dataset[record.row][part.image_column] if part.dataset is not None and record.row is not None else None
    path = cell if isinstance(cell, str) else (cell or {}).get("path") if isinstance(cell, dict) else None
    if not path:
        raise DataError(f"{record.name}: data.references pairs image files; this dataset row has no file path")
    return Path(path)


def _named_references(source: Path) -> dict[str, str]:
    """``file_name -> reference`` from the ``reference`` column of ``source/metadata.jsonl`` (empty without)."""
    path = source / METADATA
    if not path.is_file():
        return {}
    named: dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{i}: not a JSON object ({e})") from None
        if isinstance(row, dict) and row.get(REFERENCE_COLUMN) and row.get("file_name"):
            named[str(Path(row["file_name"]))] = str(row[REFERENCE_COLUMN])
    return named


def _reference_path(folder: Path, source: Path, target: Path, named: dict[str, str]) -> Path | None:
    """The reference file of a target: named by metadata.jsonl, else the same path relative to its source
    folder, any extension."""
    try:
        rel = target.resolve().relative_to(source.resolve())
    except ValueError:
        rel = Path(target.name)
    if str(rel) in named:
        return folder / named[str(rel)]
    for ext in (target.suffix, *IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)):
        candidate = (folder / rel).with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def scan_references(cfg: DataConfig, data: ScannedData) -> ScannedData:
    """One reference record per target record of ``data``, in the same order (``records[i]`` is target ``i``'s
    reference); its caption is empty. Every reference is read and decoded here."""
    if not cfg.references:
        raise ValueError("data.references is not set")
    folder = Path(cfg.references).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.references {folder}: no such folder")
    sources = [Path(d.source).expanduser() for d in cfg.dataset_configs()]
    named = [_named_references(s) if s.is_dir() else {} for s in sources]
    records: list[ImageRecord] = []
    seen: dict[Path, ImageRecord] = {}
    for r in data.records:
        path = _reference_path(folder, sources[r.part], _target_file(data, r), named[r.part])
        if path is None:
            raise DataError(f"pair {r.name}: no reference of the same name in {folder}")
        if not path.is_file():
            raise DataError(f"pair {r.name}: its reference {path} (metadata.jsonl) does not exist")
        if path not in seen:
            try:
                raw = path.read_bytes()
                image = decode(raw)
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"pair {r.name}: reference {path} is not a readable image ({e})") from None
            seen[path] = ImageRecord(
                str(path), "", hashlib.sha256(raw).hexdigest(), image.width, image.height, path=str(path)
            )
        records.append(seen[path])
    return ScannedData(str(folder), records)


def reference_placement(target: Crop, width: int, height: int) -> Crop:
    """Where a ``width x height`` reference goes for a target placed as ``target`` (module docstring)."""
    if resized_size(width, height, target.bucket) == target.resized:
        return target  # resized alike (the target's size, or its aspect ratio): the target's crop and flip
    (center,) = image_crops(width, height, target.bucket, crop="center", variants=1, flip=False, seed="")
    return replace(center, flip=target.flip)


def plan_references(plan: CachePlan, references: ScannedData, ae_spec: AutoEncoderSpec) -> CachePlan:
    """A cache plan of the references' latent entries: ``variants[i][v]`` is the reference of sample ``i``'s
    variant ``v``; no captions."""
    variants = []
    for record, jobs in zip(plan.records, plan.variants, strict=True):
        ref = references.records[record]
        places = [reference_placement(j.placement, ref.width, ref.height) for j in jobs]
        variants.append([LatentJob(record, p, ae_spec.key(ref.image_hash, p)) for p in places])
    return CachePlan(
        plan.root,
        plan.text_spec,
        ae_spec,
        [],
        list(plan.buckets),
        variants,
        {},
        records=list(plan.records),
        names=[references.records[r].name for r in plan.records],
    ).refresh()
