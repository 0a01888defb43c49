"""Streaming sources (``data.streaming``): a dataset that does not fit on local disk is read as it trains.

The source is opened with ``datasets.load_dataset(..., streaming=True)``: a dataset name (``user/name`` on the
Hub, or any builder ``datasets`` knows), or WebDataset tar shards (a ``.tar`` path, glob or URL, read by
``datasets``' own ``webdataset`` builder; its columns are the members' suffixes, e.g. ``image_column: jpg``,
``caption_column: txt``). :func:`stream_into_cache` reads it once, :data:`CHUNK` examples at a time: each chunk
is hashed and probed in memory, planned and encoded into the cache by :func:`flux_lora.data.cache.fill_cache`
(the same fill as a folder's), then its bytes are dropped. What was read (name, caption, image hash, size) is
kept in ``<cache>/streams/<id>.json``; :func:`flux_lora.data.scan.scan_stream` reads that file, so the scan,
the plan and training use the cache only and a rerun does not stream again (delete the folder to read the source
anew, e.g. after it changed). An interrupted pass streams again from the start but encodes only what the cache lacks.

Several processes started together by torchrun split each stream between the processes of their node
(``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``, passed as ``rank`` of ``ranks``; ``datasets.distributed.
split_dataset_by_node``: whole shards per process when their count divides, else every ``ranks``-th example):
each reads and encodes only its part (no fill lock: the parts hold other examples) and records it in
``<cache>/streams/<id>.part<r>of<n>.json``; rank 0 waits for every part, writes the whole record (parts in
rank order) and removes the parts; the others wait for the whole record. A rank that fails writes
``<token>.failed<r>`` beside them and the others stop with an error (the token names this launch: markers of
an earlier one are ignored, and removed once a week old); a part recorded by an interrupted launch with as
many processes is not read again. The record's order, and so the run's, depends on the number of processes.
The split is per node: each node reads every example once (into its own cache folder, or into a shared one
where the nodes write the same entries). Lightning's own launcher starts the other processes only once
training begins, and srun gives no such split here: there, each process reads the whole stream and the fill
lock makes one of them encode each chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from flux_lora.atomic import write_text_atomic
from flux_lora.config import DataConfig, DataError
from flux_lora.data.cache import AutoEncoderSpec, Share, TextEncoderSpec, fill_cache, plan_cache
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
from flux_lora.data.shards import FILL_TIMEOUT, POLL_S, STALE_S, WAIT_LOG_S
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


def _read(
    cfg: DataConfig,
    ds: Any,
    text_spec: TextEncoderSpec,
    ae_spec: AutoEncoderSpec,
    load_text_encoders: Callable[[], TextEncoders],
    load_autoencoder: Callable[[], AutoEncoder],
    device: str | torch.device,
    chunk: int,
    part: tuple[int, int],
) -> tuple[list[list[Any]], list[list[str]], int]:
    """Read ``ds`` once, encoding each chunk into the cache as it arrives: ``(images, skipped, latents
    encoded)``. ``part``: ``(rank, ranks)`` of the split this process reads; with several, the names say which
    part an example came from and the fill runs without the lock (the parts hold other examples)."""
    rank, world = part
    prefix = f"{cfg.source}[" if world == 1 else f"{cfg.source}[part {rank + 1} of {world}: "
    probe_dir = cfg.cache_path / "probe"
    images: list[list[Any]] = []
    skipped: list[list[str]] = []
    encoded = 0
    for examples in _chunks(ds, chunk):
        rows: list[dict[str, Any]] = []
        records: list[ImageRecord] = []
        for example in examples:
            key = example.get("__key__")
            name = f"{prefix}{len(images) + len(skipped)}]" + (f" ({key})" if key else "")
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
                plan,
                data_chunk,
                load_text_encoders,
                load_autoencoder,
                device,
                cfg.encode_batch_size,
                progress=False,
                share=None if world == 1 else Share(0, 1),
            ).latents
        log.info(
            "%sstreamed %d images of %s (%d latents encoded so far)",
            "" if world == 1 else f"rank {rank}: ",
            len(images),
            cfg.source,
            encoded,
        )
    return images, skipped, encoded


def stream_into_cache(
    cfg: DataConfig,
    text_spec: TextEncoderSpec,
    ae_spec: AutoEncoderSpec,
    load_text_encoders: Callable[[], TextEncoders],
    load_autoencoder: Callable[[], AutoEncoder],
    device: str | torch.device = "cpu",
    chunk: int = CHUNK,
    rank: int = 0,
    ranks: int = 1,
) -> tuple[int, int]:
    """Read the stream of ``cfg`` (one dataset) once, encoding each chunk into the cache as it arrives, and
    record it (:func:`manifest_path`); nothing is done when a complete record exists. With ``ranks`` > 1 (every
    one of them must call this): this process reads and encodes only its part of the stream
    (``datasets.distributed.split_dataset_by_node``), records it, and the parts are merged into the record once
    all are there (see the module's text). Returns ``(images, latents encoded)`` of this process."""
    if read_manifest(cfg) is not None:
        return 0, 0
    if ranks == 1:
        log.info("streaming %s into the cache %s", cfg.source, cfg.cache_path)
        images, skipped, encoded = _read(
            cfg, open_stream(cfg), text_spec, ae_spec, load_text_encoders, load_autoencoder, device, chunk, (0, 1)
        )
        _write_record(manifest_path(cfg), images, skipped)
        return len(images), encoded
    from datasets.distributed import split_dataset_by_node

    token, path = _launch_token(), part_path(cfg, rank, ranks)
    try:
        found = _read_record(path)
        if found is None:
            log.info(
                "rank %d: streaming part %d of %d of %s into %s", rank, rank + 1, ranks, cfg.source, cfg.cache_path
            )
            ds = split_dataset_by_node(open_stream(cfg), rank=rank, world_size=ranks)
            images, skipped, encoded = _read(
                cfg, ds, text_spec, ae_spec, load_text_encoders, load_autoencoder, device, chunk, (rank, ranks)
            )
            _write_record(path, images, skipped)
        else:  # this part was read by an interrupted run with as many ranks
            images, encoded = found["images"], 0
        _merge_parts(cfg, rank, ranks, token)
    except BaseException:
        write_text_atomic(path.with_name(f"{token}.failed{rank}"), "")
        raise
    return len(images), encoded


def part_path(cfg: DataConfig, rank: int, ranks: int) -> Path:
    """Where rank ``rank`` of ``ranks`` records its part of the stream of ``cfg`` (beside the whole record)."""
    whole = manifest_path(cfg)
    return whole.with_name(f"{whole.stem}.part{rank}of{ranks}.json")


def _write_record(path: Path, images: list[list[Any]], skipped: list[list[str]]) -> None:
    manifest = {"version": MANIFEST_VERSION, "complete": True, "images": images, "skipped": skipped}
    write_text_atomic(path, json.dumps(manifest))


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(found, dict) and found.get("version") == MANIFEST_VERSION and found.get("complete")
    return found if ok else None


def _launch_token() -> str:
    """Names this launch's failure markers without any message between the processes: the processes of one node
    that torchrun started share their parent (its pid and start time) and the launcher's settings; markers of
    an earlier launch carry another token and are ignored."""
    parent = str(os.getppid())
    with contextlib.suppress(OSError, IndexError):  # Linux: the parent's start time, against reused pids
        parent += ":" + Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    env = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")]
    return "stream-" + hashlib.sha256(json.dumps([parent, *env]).encode()).hexdigest()[:16]


def _merge_parts(cfg: DataConfig, rank: int, ranks: int, token: str) -> None:
    """Rank 0 waits for every part, writes the whole record (parts in rank order) and removes the parts; the
    others wait for the whole record. A rank that failed (its marker with this launch's token) stops the wait."""
    whole = manifest_path(cfg)
    parts = [part_path(cfg, r, ranks) for r in range(ranks)]
    started = last_log = time.monotonic()
    while True:
        if read_manifest(cfg) is not None:  # merged (by another node's first process, in a shared folder)
            return
        if rank == 0 and all(p.exists() for p in parts):  # each written whole (atomically)
            found = [_read_record(p) for p in parts]
            if all(f is not None for f in found):
                images = [i for f in found if f is not None for i in f["images"]]
                skipped = [s for f in found if f is not None for s in f["skipped"]]
                _write_record(whole, images, skipped)
                _remove_parts(whole)
                log.info("stream %s: %d parts merged, %d images", cfg.source, ranks, len(images))
                return
        failed = [r for r in range(ranks) if r != rank and whole.with_name(f"{token}.failed{r}").exists()]
        if failed:
            raise RuntimeError(f"rank {failed[0]} failed while streaming {cfg.source} into the cache")
        now = time.monotonic()
        if now - started > FILL_TIMEOUT.total_seconds():
            raise RuntimeError(f"the other ranks did not finish streaming {cfg.source} in time")
        if now - last_log >= WAIT_LOG_S:
            waiting = [r for r, p in enumerate(parts) if not p.exists()] if rank == 0 else [0]
            log.info("rank %d: part streamed, waiting for ranks %s", rank, waiting)
            last_log = now
        time.sleep(POLL_S)


def _remove_parts(whole: Path) -> None:
    """The parts of the record ``whole`` (of any number of ranks), and failure markers a week old."""
    now = time.time()
    for path in whole.parent.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if path.name.startswith(f"{whole.stem}.part") or (
                ".failed" in path.name and now - path.stat().st_mtime > STALE_S
            ):
                path.unlink()


def fill_streams(
    cfg: DataConfig,
    text_spec: TextEncoderSpec,
    ae_spec: AutoEncoderSpec,
    load_text_encoders: Callable[[], TextEncoders],
    load_autoencoder: Callable[[], AutoEncoder],
    device: str | torch.device = "cpu",
    rank: int = 0,
    ranks: int = 1,
) -> None:
    """:func:`stream_into_cache` for every streaming dataset of ``cfg`` (``data.datasets`` or the single one),
    this process being ``rank`` of the ``ranks`` that read each stream together."""
    for part in streaming_datasets(cfg):
        stream_into_cache(
            part, text_spec, ae_spec, load_text_encoders, load_autoencoder, device, rank=rank, ranks=ranks
        )


def streaming_datasets(cfg: DataConfig) -> Sequence[DataConfig]:
    return [d for d in cfg.dataset_configs() if d.streaming] if any_streaming(cfg) else []


def any_streaming(cfg: DataConfig) -> bool:
    return cfg.streaming or any(d.streaming for d in cfg.datasets)
