"""Streaming sources (``data.streaming``): a dataset that does not fit on local disk is read as it trains.

The source is opened with ``datasets.load_dataset(..., streaming=True)``: a dataset name (``user/name`` on the
Hub, or any builder ``datasets`` knows), or WebDataset tar shards (a ``.tar`` path, glob or URL, read by
``datasets``' own ``webdataset`` builder; its columns are the members' suffixes, e.g. ``image_column: jpg``,
``caption_column: txt``). :func:`stream_into_cache` reads it once, :data:`CHUNK` examples at a time: each chunk
is hashed and probed in memory, planned and encoded into the cache by :func:`flux_lora.data.cache.fill_cache`
(the same fill as a folder's), then its bytes are dropped. What was read (name, caption, image hash, size) is
kept in ``<cache>/streams/<id>.json``; :func:`flux_lora.data.scan.scan_stream` reads that file, so the scan,
the plan and training use the cache only and a rerun does not stream again (delete the file to read the source
anew, e.g. after it changed). An interrupted pass streams again from the start but encodes only what the cache lacks.

Under DDP every process streams the same examples and calls the fill with the same chunk plan, so the fill
decides who encodes what; each process reads the whole stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch

from flux_lora.atomic import write_text_atomic
from flux_lora.config import DataConfig, DataError
from flux_lora.data.cache import AutoEncoderSpec, TextEncoderSpec, fill_cache, plan_cache
from flux_lora.data.scan import (
    MANIFEST_VERSION,
    ImageRecord,
    ScannedData,
    _probe,
    _row_bytes,
    final_caption,
    manifest_path,
    read_manifest,
)
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.text_encoders import TextEncoders

log = logging.getLogger(__name__)

CHUNK = 512  # examples held in memory (as bytes) and encoded together; the encoders load once per chunk


def is_webdataset(source: str) -> bool:
    """Whether ``source`` names WebDataset tar shards (a path, glob or URL ending in ``.tar``)."""
    return source.split("?", 1)[0].endswith(".tar")


def open_stream(cfg: DataConfig) -> Any:
    """The ``datasets.IterableDataset`` of ``cfg.source`` (streaming=True), its image column read as bytes."""
    import datasets

    hf_cache = str(cfg.cache_path / "hf-datasets")
    try:
        if is_webdataset(cfg.source):
            ds = datasets.load_dataset(
                "webdataset", data_files={cfg.split: cfg.source}, split=cfg.split, streaming=True, cache_dir=hf_cache
            )
        else:
            ds = datasets.load_dataset(cfg.source, split=cfg.split, streaming=True, cache_dir=hf_cache)
    except Exception as e:
        raise DataError(f"data.source {cfg.source!r} could not be streamed ({type(e).__name__}: {e})") from e
    features = ds.features
    if features is not None:
        for role, column in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
            if column not in features:
                raise DataError(
                    f"column {column!r} (data.{role}) is not in the stream {cfg.source}; columns: {list(features)}"
                )
        if isinstance(features[cfg.image_column], datasets.Image):
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    return ds


def _chunks(ds: Any, size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(ds)
    while chunk := list(islice(it, size)):
        yield chunk


def stream_into_cache(
    cfg: DataConfig,
    text_spec: TextEncoderSpec,
    ae_spec: AutoEncoderSpec,
    load_text_encoders: Callable[[], TextEncoders],
    load_autoencoder: Callable[[], AutoEncoder],
    device: str | torch.device = "cpu",
    chunk: int = CHUNK,
) -> tuple[int, int]:
    """Read the stream of ``cfg`` (one dataset) once, encoding each chunk into the cache as it arrives, and
    record it (:func:`manifest_path`); nothing is done when a complete record exists. Returns ``(images,
    latents encoded)``."""
    if read_manifest(cfg) is not None:
        return 0, 0
    log.info("streaming %s into the cache %s", cfg.source, cfg.cache_path)
    probe_dir = cfg.cache_path / "probe"
    images: list[list[Any]] = []
    skipped: list[list[str]] = []
    encoded = 0
    for examples in _chunks(open_stream(cfg), chunk):
        rows: list[dict[str, Any]] = []
        records: list[ImageRecord] = []
        for example in examples:
            key = example.get("__key__")
            name = f"{cfg.source}[{len(images) + len(skipped)}]" + (f" ({key})" if key else "")
            try:
                data = _row_bytes(example.get(cfg.image_column), name)
            except DataError as e:
                skipped.append([name, str(e)])
                continue
            digest = hashlib.sha256(data).hexdigest()
            probed = _probe(data, digest, probe_dir, name)
            if isinstance(probed, str):
                log.warning("skipping %s: the image cannot be read (%s)", name, probed)
                skipped.append([name, probed])
                continue
            raw = example.get(cfg.caption_column)
            images.append([name, raw, digest, probed[0], probed[1]])
            caption = final_caption(cfg, raw, None, name)
            if caption is None:
                raise DataError(
                    f"{name} in the stream {cfg.source} has no caption (column {cfg.caption_column!r}); "
                    "add captions or set data.default_caption"
                )
            records.append(
                ImageRecord(name, caption, digest, probed[0], probed[1], row=len(rows), loss_weight=cfg.loss_weight)
            )
            rows.append({"image": {"bytes": data}})
        if not records:
            continue
        data_chunk = ScannedData(cfg.source, records, dataset=rows, image_column="image")
        plan = plan_cache(data_chunk, cfg, text_spec, ae_spec, quiet=True)
        if not plan.complete:
            encoded += fill_cache(
                plan, data_chunk, load_text_encoders, load_autoencoder, device, cfg.encode_batch_size, progress=False
            ).latents
        log.info("streamed %d images of %s (%d latents encoded so far)", len(images), cfg.source, encoded)
    manifest = {"version": MANIFEST_VERSION, "complete": True, "images": images, "skipped": skipped}
    write_text_atomic(manifest_path(cfg), json.dumps(manifest))
    return len(images), encoded


def fill_streams(
    cfg: DataConfig,
    text_spec: TextEncoderSpec,
    ae_spec: AutoEncoderSpec,
    load_text_encoders: Callable[[], TextEncoders],
    load_autoencoder: Callable[[], AutoEncoder],
    device: str | torch.device = "cpu",
) -> None:
    """:func:`stream_into_cache` for every streaming dataset of ``cfg`` (``data.datasets`` or the single one)."""
    for part in streaming_datasets(cfg):
        stream_into_cache(part, text_spec, ae_spec, load_text_encoders, load_autoencoder, device)


def streaming_datasets(cfg: DataConfig) -> Sequence[DataConfig]:
    return [d for d in cfg.dataset_configs() if d.streaming] if any_streaming(cfg) else []


def any_streaming(cfg: DataConfig) -> bool:
    return cfg.streaming or any(d.streaming for d in cfg.datasets)
