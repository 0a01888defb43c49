"""The content-keyed disk cache of text embeddings and latents, filled before training, then the encoders go.

Layout under the cache folder, one safetensors file per entry (written to a unique temporary name, then
renamed atomically, so readers and concurrent writers never see half a file)::

    text/<k[:2]>/<k>.safetensors      txt [L, d_t5], y [d_clip]    k = sha256(text-encoder id, caption)
    latents/<k[:2]>/<k>.safetensors   latents [z, h, w]            k = sha256(autoencoder id, image, crop)

An encoder's identity (:class:`TextEncoderSpec`, :class:`AutoEncoderSpec`) is a fingerprint of its files (or
of a loaded module's tensors), its compute dtype, and for text the tokenizer settings and T5 max length. So
editing a caption re-encodes that caption only, editing an image re-encodes its latents only, and another
encoder misses everything. Entries are stored in the dtype the encoder produced (bf16 on a GPU).

Random crops and flips: each image has a fixed set of cached variants (``buckets.image_crops``):
``crop_variants`` random crops chosen from ``(seed, image hash)`` and, with flip on, each crop mirrored too;
the batch sampler draws one variant per use. Latents are the autoencoder's mean (no sampling), so they are
deterministic and cacheable.

Use: ``plan = plan_cache(...)`` (no encoder is loaded), ``fill_cache(plan, ...)`` (loads an encoder only if
an entry it serves is missing, writes as it goes so an interrupted pass resumes, then releases it), and
``plan.refresh().complete``. ``fill_cache`` holds a file lock on the cache folder: when several processes
call it together, one encodes and the others wait, then find everything cached and load nothing. Given a
:class:`Share`, it encodes only the missing entries that share owns, without the lock (shares are disjoint):
:mod:`flux_lora.data.shards` has every rank of a distributed run fill its own.

Every entry carries a sha256 of its tensors in its header (``flux_lora.sha256``), verified when it is read.
An entry that is empty, truncated, unreadable or fails its checksum counts as missing: it is named in a
warning and encoded again. A plan checks each entry once per file version: it records the ``stat`` of the
entries it verified (and a fill those it wrote, whose bytes it checksummed) in ``verified.json``, so a later
process plans a complete cache with one ``stat`` per entry (no folder listed, no entry read; caches written
before this file existed are verified once, then recorded). (Entries written before checksums existed are
accepted if they read whole and hold only finite values.)
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from flux_lora.atomic import save_safetensors_atomic, write_text_atomic
from flux_lora.config import DataConfig
from flux_lora.data.buckets import Crop, apply_crop, bucket_sizes, choose_bucket, cover_scale, image_crops
from flux_lora.data.fingerprint import fingerprint_module, fingerprint_paths, tokenizer_identity
from flux_lora.data.masks import latent_mask, mask_hash, read_mask
from flux_lora.data.scan import ScannedData
from flux_lora.dtypes import dtype_from_name, dtype_name
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.text_encoders import CLIP_MAX_LENGTH, TextEmbeddings, TextEncoders
from flux_lora.weights.loading import find_ae_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# What TextEncoders.tokenize does; part of every text key, so a change here invalidates the text cache.
TOKENIZER_SETTINGS = {
    "clip_max_length": CLIP_MAX_LENGTH,
    "padding": "max_length",
    "truncation": True,
    "attention_mask": False,
}
LATENT_SETTINGS = {"resample": "lanczos", "latent": "mean", "pixels": "[-1, 1]"}
TEXT_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def _sha(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TextEncoderSpec:
    """Identity of the text encoders (CLIP-L + T5): weights and tokenizers, T5 max length, compute dtype."""

    fingerprint: str
    max_length: int
    dtype: str

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int, dtype: torch.dtype | str) -> TextEncoderSpec:
        """From a FLUX.1-layout folder: ``text_encoder[_2]`` and ``tokenizer[_2]``."""
        folder = Path(folder)
        return cls(fingerprint_paths(folder / sub for sub in TEXT_FOLDERS), max_length, dtype_name(dtype))

    @classmethod
    def from_module(cls, encoders: TextEncoders) -> TextEncoderSpec:
        """From loaded encoders (hashes every weight; meant for small or already-loaded models)."""
        extra = [tokenizer_identity(encoders.clip_tokenizer), tokenizer_identity(encoders.t5_tokenizer)]
        return cls(
            fingerprint_module(encoders, extra), encoders.max_length, dtype_name(next(encoders.t5.parameters()).dtype)
        )

    def key(self, caption: str) -> str:
        return _sha(
            {
                "v": CACHE_VERSION,
                "kind": "text",
                "encoder": self.fingerprint,
                "max_length": self.max_length,
                "dtype": self.dtype,
                "tokenizer": TOKENIZER_SETTINGS,
                "caption": caption,
            }
        )


@dataclass(frozen=True)
class AutoEncoderSpec:
    """Identity of the autoencoder: its weights and compute dtype."""

    fingerprint: str
    dtype: str

    @classmethod
    def from_folder(cls, source: str | Path, dtype: torch.dtype | str) -> AutoEncoderSpec:
        """From ``ae.safetensors`` in a model folder, a diffusers ``vae/`` folder or a single file."""
        return cls(fingerprint_paths([find_ae_file(Path(source))]), dtype_name(dtype))

    @classmethod
    def from_module(cls, ae: AutoEncoder) -> AutoEncoderSpec:
        return cls(fingerprint_module(ae, [json.dumps(ae.params.to_dict())]), dtype_name(next(ae.parameters()).dtype))

    def key(self, image_hash: str, placement: Crop, mask: str = "") -> str:
        """``mask`` (see :func:`flux_lora.data.masks.mask_hash`) is part of the key when set."""
        return _sha(
            {
                "v": CACHE_VERSION,
                "kind": "latent",
                "encoder": self.fingerprint,
                "dtype": self.dtype,
                "image": image_hash,
                "placement": placement.to_dict(),
                "settings": LATENT_SETTINGS,
                **({"mask": mask} if mask else {}),
            }
        )


CHECKSUM_KEY = "flux_lora.sha256"
# entry path -> (inode, size, mtime) of the version that verified, or (inode, size, mtime, False) of one that failed
_VERIFIED: dict[str, tuple[int, ...]] = {}
VERIFIED_FILE = "verified.json"  # under the cache root: stamps of entries an earlier process verified
RACY_NS = 2_000_000_000  # an entry written this close to its check is checked again by the next process


class CacheEntryError(RuntimeError):
    """A cache entry that cannot be used (empty, truncated, unreadable, or its checksum does not match)."""


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of ``tensors`` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_entry(path: Path) -> dict[str, Tensor]:
    """The tensors of one cache entry, verified; :class:`CacheEntryError` naming the file otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get(CHECKSUM_KEY)
            # copied out of the file's memory map: a later rewrite of the file must not change them
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as e:  # safetensors raises several types for empty or truncated files
        raise CacheEntryError(f"cache entry {path} is unreadable ({type(e).__name__}: {e})") from None
    if expected is None:  # written before checksums: accept only whole, finite values
        if not all(bool(torch.isfinite(t.float()).all()) for t in tensors.values()):
            raise CacheEntryError(f"cache entry {path} holds non-finite values")
    elif tensors_sha256(tensors) != expected:
        raise CacheEntryError(f"cache entry {path} fails its checksum (its bytes changed after it was written)")
    return tensors


class CacheStore:
    """Paths, reads (verified) and atomic writes (checksummed) of cache entries under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def usable(path: str | Path) -> bool:
        """Whether the entry at ``path`` exists and verifies (checked once per file version: in this process,
        or by an earlier one whose stamps :meth:`load_verified` read); a bad entry is named in a warning and
        counts as missing. A look-up is one ``stat`` (no folder is listed)."""
        name = str(path)
        try:
            st = os.stat(name)
        except FileNotFoundError:
            return False
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        known = _VERIFIED.get(name)
        if known == stamp:
            return True
        if known == (*stamp, False):
            return False
        try:
            read_entry(Path(name))
        except CacheEntryError as e:
            log.warning("%s: encoding it again", e)
            _VERIFIED[name] = (*stamp, False)
            return False
        _VERIFIED[name] = stamp
        return True

    def load_verified(self) -> dict[str, list[int]]:
        """Take the stamps of entries an earlier process verified (``verified.json``): an entry whose stat is
        unchanged since is trusted without reading it again (it is still verified when training reads it)."""
        try:
            found = json.loads((self.root / VERIFIED_FILE).read_text())
        except (OSError, ValueError):
            return {}  # none yet, or damaged: entries are verified again
        if not isinstance(found, dict):
            return {}
        base = str(self.root) + os.sep
        for rel, stamp in found.items():
            if isinstance(stamp, list) and len(stamp) == 3:
                _VERIFIED.setdefault(base + rel, tuple(stamp))
        return found

    def save_verified(self, started_ns: int, loaded: dict[str, list[int]]) -> None:
        """Record the stamps of the entries under this cache verified in this process (those written more than
        :data:`RACY_NS` before ``started_ns``, the time the check began), unless they equal ``loaded``."""
        base = str(self.root) + os.sep
        stamps = {
            name[len(base) :]: list(stamp)
            for name, stamp in _VERIFIED.items()
            if name.startswith(base) and len(stamp) == 3 and stamp[2] + RACY_NS <= started_ns
        }
        if stamps and stamps != loaded:
            write_text_atomic(self.root / VERIFIED_FILE, json.dumps(stamps))

    def _text_name(self, key: str) -> str:
        return f"{self.root}{os.sep}text{os.sep}{key[:2]}{os.sep}{key}.safetensors"

    def _latent_name(self, key: str) -> str:
        return f"{self.root}{os.sep}latents{os.sep}{key[:2]}{os.sep}{key}.safetensors"

    def text_path(self, key: str) -> Path:
        return Path(self._text_name(key))

    def latent_path(self, key: str) -> Path:
        return Path(self._latent_name(key))

    def _write(self, tensors: dict[str, Tensor], name: str, metadata: dict[str, str]) -> None:
        """Write one entry, checksummed, and remember its stamp as verified (these are the bytes just summed), so
        the plan after a fill reads none of them back (:meth:`save_verified` records them for later processes)."""
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_safetensors_atomic(tensors, name, {**metadata, CHECKSUM_KEY: tensors_sha256(tensors)})
        st = os.stat(name)
        _VERIFIED[name] = (st.st_ino, st.st_size, st.st_mtime_ns)

    def write_text(self, key: str, txt: Tensor, y: Tensor, caption: str) -> None:
        self._write({"txt": txt, "y": y}, self._text_name(key), {"caption": caption})

    def write_latent(self, key: str, latents: Tensor, name: str, mask: Tensor | None = None) -> None:
        tensors = {"latents": latents} if mask is None else {"latents": latents, "mask": mask}
        self._write(tensors, self._latent_name(key), {"image": name})

    def read_text(self, key: str) -> tuple[Tensor, Tensor]:
        """``(txt [L, d_t5], y [d_clip])``, verified."""
        entry = read_entry(self.text_path(key))
        return entry["txt"], entry["y"]

    def read_latent(self, key: str) -> Tensor:
        """``latents [z, h, w]``, verified."""
        return read_entry(self.latent_path(key))["latents"]

    def read_latent_entry(self, key: str) -> dict[str, Tensor]:
        """``latents [z, h, w]`` and, for masked training, ``mask [h, w]``, verified."""
        return read_entry(self.latent_path(key))


@dataclass(frozen=True, slots=True)
class LatentJob:
    """One latent entry: record ``record`` of the scanned data placed as ``placement``."""

    record: int
    placement: Crop
    key: str


@dataclass
class CachePlan:
    """Every entry the training run needs and which of them are missing, computed without any encoder.

    A sample is one (record, resolution) pair: every image appears once per resolution of its dataset.
    ``records[i]`` is sample ``i``'s record, ``captions[i]`` its caption, ``repeats[i]`` its times per epoch;
    ``variants[i]`` its latent entries (one per crop/flip variant, all in bucket ``buckets[i]``). ``text_keys``
    maps every caption, the empty caption and each sample prompt to its key.
    """

    root: Path
    text_spec: TextEncoderSpec
    ae_spec: AutoEncoderSpec
    captions: list[str]
    buckets: list[tuple[int, int]]
    variants: list[list[LatentJob]]
    text_keys: dict[str, str]
    missing_text: list[str] = field(default_factory=list)
    missing_latents: list[LatentJob] = field(default_factory=list)
    records: list[int] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # sample i's image file (or dataset row) name
    weights: list[float] = field(default_factory=list)  # sample i's loss weight (its dataset's data.loss_weight)
    masks: str | None = None  # data.masks: each latent entry also holds the loss mask

    @property
    def store(self) -> CacheStore:
        return CacheStore(self.root)

    @property
    def complete(self) -> bool:
        return not self.missing_text and not self.missing_latents

    def refresh(self) -> CachePlan:
        """The same plan with ``missing_*`` recomputed from what is on disk now."""
        store, started = self.store, time.time_ns()
        loaded = store.load_verified()
        missing_text = [c for c, k in self.text_keys.items() if not store.usable(store._text_name(k))]
        seen: set[str] = set()
        missing_latents = []
        for job in (j for jobs in self.variants for j in jobs):
            if job.key not in seen and not store.usable(store._latent_name(job.key)):
                missing_latents.append(job)
            seen.add(job.key)
        store.save_verified(started, loaded)
        return replace(self, missing_text=missing_text, missing_latents=missing_latents)


def plan_cache(
    data: ScannedData,
    cfg: DataConfig,
    text_spec: TextEncoderSpec,
    ae_spec: AutoEncoderSpec,
    sample_prompts: Sequence[str] = (),
    quiet: bool = False,
) -> CachePlan:
    """Buckets, crop variants and cache keys for every (record, resolution) sample, and what is missing. Loads
    no encoder; ``quiet`` leaves out the summary lines (for a process that plans a second time). Resolutions
    come from each record's dataset (``record.part`` of ``cfg.dataset_configs()``)."""
    datasets = cfg.dataset_configs()
    standard = {res: bucket_sizes(res, cfg.max_aspect, cfg.bucket_step) for res in cfg.all_resolutions}
    records, buckets, variants, repeats, resolutions = [], [], [], [], []
    for i, r in enumerate(data.records):
        mask = mask_hash(cfg.masks, r)  # a missing mask file fails here, before any encoder loads
        for res in datasets[r.part].resolutions:
            bucket = choose_bucket(
                r.width, r.height, standard[res], resolution=res, max_aspect=cfg.max_aspect, upscale=cfg.upscale
            )
            places = image_crops(
                r.width,
                r.height,
                bucket,
                crop=cfg.crop,
                variants=cfg.crop_variants,
                flip=cfg.flip,
                seed=f"{cfg.seed}:{r.image_hash}",
            )
            records.append(i)
            buckets.append(bucket)
            variants.append([LatentJob(i, p, ae_spec.key(r.image_hash, p, mask)) for p in places])
            repeats.append(r.repeats)
            resolutions.append(res)
    captions = [data.records[i].caption for i in records]
    text_keys = {c: text_spec.key(c) for c in dict.fromkeys(["", *captions, *sample_prompts])}
    plan = CachePlan(
        cfg.cache_path,
        text_spec,
        ae_spec,
        captions,
        buckets,
        variants,
        text_keys,
        records=records,
        repeats=repeats,
        names=[data.records[i].name for i in records],
        weights=[data.records[i].loss_weight for i in records],
        masks=cfg.masks,
    )
    plan = plan.refresh()
    if quiet:
        return plan
    _warn_poor_fits(data, plan, resolutions)
    log.info(
        "cache %s: %d of %d captions and %d of %d latents to encode",
        plan.root,
        len(plan.missing_text),
        len(text_keys),
        len(plan.missing_latents),
        len({j.key for jobs in variants for j in jobs}),
    )
    _log_buckets(data, plan, datasets)
    return plan


def _warn_poor_fits(data: ScannedData, plan: CachePlan, resolutions: list[int]) -> None:
    """Name the images that train as a handful of tokens (under 1/16 of the area of their resolution) or that
    lose more than half of their area to the crop into their bucket."""
    small, cropped = [], []
    for i, (bw, bh), res in zip(plan.records, plan.buckets, resolutions, strict=True):
        r = data.records[i]
        if bw * bh * 16 < res * res:
            small.append(f"{r.name} ({bw}x{bh}: {(bw // 16) * (bh // 16)} tokens)")
        scale = cover_scale(r.width, r.height, (bw, bh))
        kept = bw * bh / (r.width * r.height * scale * scale)
        if kept < 0.5:
            cropped.append(f"{r.name} ({kept:.0%} kept)")
    if small:
        log.warning("%d images train as only a few tokens: %s", len(small), small[:5])
    if cropped:
        log.warning(
            "%d images lose most of their area to the crop (see data.max_aspect): %s", len(cropped), cropped[:5]
        )


def _log_buckets(data: ScannedData, plan: CachePlan, datasets: list[DataConfig]) -> None:
    """Which images went where: per dataset, the samples (with repeats) in each bucket."""
    per: dict[int, Counter[tuple[int, int]]] = {}
    for i, bucket in zip(plan.records, plan.buckets, strict=True):
        per.setdefault(data.records[i].part, Counter())[bucket] += data.records[i].repeats
    for part, counts in sorted(per.items()):
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
        log.info("dataset %s: samples per epoch by bucket: %s", datasets[part].source, sizes)


# ------------------------------------------------------------------------------------------ filling


@dataclass(frozen=True)
class FillStats:
    """What one :func:`fill_cache` call encoded (counts only; nothing here references an encoder) and which
    encoders it loaded (``"text encoders"``, ``"autoencoder"``)."""

    texts: int = 0
    latents: int = 0
    loaded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Share:
    """Share ``index`` of ``count`` of the cache entries: an entry is owned by exactly one share, chosen by its
    key (a sha256), so every process and every rerun agrees on who encodes what without talking."""

    index: int = 0
    count: int = 1
    label: str = ""  # names the process in log lines, e.g. "rank 3"

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"share {self.index} is outside {self.count} shares")

    def owns(self, key: str) -> bool:
        return int(key[:16], 16) % self.count == self.index

    def of(self, plan: CachePlan) -> CachePlan:
        """``plan`` with only the missing entries this share owns."""
        return replace(
            plan,
            missing_text=[c for c in plan.missing_text if self.owns(plan.text_keys[c])],
            missing_latents=[j for j in plan.missing_latents if self.owns(j.key)],
        )


PROGRESS_EVERY_S = 30.0  # a progress line in the log this often while a share is encoded


class _LogProgress:
    """Log lines ``<label>: <done> of <total> <what>`` every :data:`PROGRESS_EVERY_S` seconds (and at the end),
    for processes whose progress bar nobody sees (other ranks, a log file)."""

    def __init__(self, label: str, what: str, total: int):
        self.label, self.what, self.total, self.done = label, what, total, 0
        self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.label and (now - self.last >= PROGRESS_EVERY_S or self.done == self.total):
            log.info("%s: encoded %d of %d %s", self.label, self.done, self.total, self.what)
            self.last = now


@contextlib.contextmanager
def fill_lock(root: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``root/.fill.lock`` (``flock``; a no-op where ``fcntl`` is missing, where
    the atomic writes alone keep concurrent fills correct, only not free of duplicate work)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(root / ".fill.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process filling the cache %s", root)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def release(module: nn.Module | None) -> None:
    """Free a module's memory on the accelerator and the host, even if a stray reference to it survives: its
    tensors move to the meta device. Then collect garbage and empty the CUDA cache."""
    if module is not None:
        module.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_dtype(module: nn.Module, expected: str, what: str) -> None:
    """The dtype holding most of the weights must be the spec's (a few layers may be kept in float32, as
    transformers does for T5's ``wo`` in float16)."""
    sizes: Counter[str] = Counter()
    for p in module.parameters():
        sizes[dtype_name(p.dtype)] += p.numel()
    found = sizes.most_common(1)[0][0] if sizes else None
    if found != expected:
        raise ValueError(
            f"the loaded {what} computes in {found} but the cache plan expects {expected}; "
            "build the spec with the dtype the loader uses"
        )


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _encode_texts(
    encoders: TextEncoders,
    plan: CachePlan,
    batch_size: int,
    progress: bool,
    cut: list[str] | None = None,
    label: str = "",
) -> int:
    """Encode the plan's missing captions; those longer than T5's ``max_length`` (cut) are added to ``cut``."""
    store, logged = plan.store, _LogProgress(label, "captions", len(plan.missing_text))
    with tqdm(
        total=len(plan.missing_text), desc="caching text embeddings", unit="caption", disable=None if progress else True
    ) as bar:
        for batch in _batches(sorted(plan.missing_text), batch_size):
            if cut is not None and encoders.t5_tokenizer is not None:
                cut += [c for c, n in zip(batch, encoders.t5_lengths(batch), strict=True) if n > encoders.max_length]
            emb = encoders.encode(batch).to("cpu")
            for i, caption in enumerate(batch):
                store.write_text(plan.text_keys[caption], emb.txt[i], emb.y[i], caption)
            bar.update(len(batch))
            logged.update(len(batch))
    return len(plan.missing_text)


def _warn_cut(cut: list[str], data: ScannedData, max_length: int) -> None:
    """One warning naming the files (or sample prompts) whose captions T5 cut at ``max_length`` tokens."""
    if not cut:
        return
    long = set(cut)
    names = [r.name for r in data.records if r.caption in long]
    prompts = [c for c in cut if not any(r.caption == c for r in data.records)]
    shown = names[:10] + [f"sample prompt {p[:40]!r}..." for p in prompts[:3]]
    more = len(names) + len(prompts) - len(shown)
    log.warning(
        "%d captions are longer than T5's %d tokens and were cut there: %s%s",
        len(cut),
        max_length,
        ", ".join(shown),
        f" and {more} more" if more > 0 else "",
    )


def image_to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> ``[3, H, W]`` float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _encode_latents(
    ae: AutoEncoder,
    plan: CachePlan,
    data: ScannedData,
    device: torch.device,
    batch_size: int,
    progress: bool,
    label: str = "",
) -> int:
    store, dtype = plan.store, dtype_from_name(plan.ae_spec.dtype)
    jobs = sorted(plan.missing_latents, key=lambda j: (j.placement.bucket, j.record, j.key))
    logged = _LogProgress(label, "latents", len(jobs))
    decoded: tuple[int, Image.Image] | None = None  # variants of one image come in a row: decode it once
    with tqdm(total=len(jobs), desc="caching latents", unit="image", disable=None if progress else True) as bar:
        for _, same_size in itertools.groupby(jobs, key=lambda j: j.placement.bucket):
            for batch in _batches(list(same_size), batch_size):
                pixels = []
                for job in batch:
                    if decoded is None or decoded[0] != job.record:
                        decoded = (job.record, data.read_image(data.records[job.record]))
                    pixels.append(image_to_tensor(apply_crop(decoded[1], job.placement)))
                with torch.no_grad():
                    latents = ae.encode(torch.stack(pixels).to(device=device, dtype=dtype)).to("cpu")
                for job, z in zip(batch, latents, strict=True):
                    record = data.records[job.record]
                    mask = None
                    if plan.masks:
                        mask = latent_mask(read_mask(plan.masks, data, record), job.placement, tuple(z.shape[-2:]))
                    store.write_latent(job.key, z, record.name, mask)
                bar.update(len(batch))
                logged.update(len(batch))
    return len(jobs)


def fill_cache(
    plan: CachePlan,
    data: ScannedData,
    load_text_encoders: Callable[[], TextEncoders],
    load_autoencoder: Callable[[], AutoEncoder],
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    progress: bool = True,
    share: Share | None = None,
) -> FillStats:
    """Encode whatever ``plan`` finds missing (re-checked under the fill lock), writing each entry as soon as
    it is encoded. A loader is called only if an entry it serves is missing; what it returns is owned by this
    call: moved to ``device``, used, then destroyed by :func:`release` (so return fresh encoders, not
    shared ones). With ``share``: only the missing entries it owns, re-checked without the lock (other shares
    write other entries meanwhile), and a loader is called only if the share owns a missing entry it serves.

    Args:
        plan: from :func:`plan_cache`; ``data``: the :class:`ScannedData` it was made from.
        load_text_encoders / load_autoencoder: build the encoders, with the dtype of the plan's specs.
        device: where to encode.
        batch_size: captions or crops per encoder call.
        share: which entries this process encodes (see :class:`Share`); None: all, under the fill lock.
    """
    device = torch.device(device)
    started = time.monotonic()
    label = share.label if share is not None else ""
    loaded: list[str] = []
    with fill_lock(plan.root) if share is None else contextlib.nullcontext():
        plan = plan.refresh() if share is None else share.of(plan.refresh())
        if label:
            log.info(
                "%s: %d captions and %d latents to encode", label, len(plan.missing_text), len(plan.missing_latents)
            )
        texts = latents = 0
        cut: list[str] = []
        if plan.missing_text:
            loaded.append("text encoders")
            texts = _with_encoder(
                load_text_encoders,
                device,
                plan.text_spec.dtype,
                "text encoders",
                lambda te: _encode_texts(te, plan, batch_size, progress, cut, label),
            )
            _warn_cut(cut, data, plan.text_spec.max_length)
        if plan.missing_latents:
            loaded.append("autoencoder")
            latents = _with_encoder(
                load_autoencoder,
                device,
                plan.ae_spec.dtype,
                "autoencoder",
                lambda ae: _encode_latents(ae, plan, data, device, batch_size, progress, label),
            )
    if texts or latents:  # the end of the cache phase: the DiT loads next
        plan.store.save_verified(time.time_ns(), {})  # what this fill wrote, for later processes
        log.info(
            "%s %s: encoded %d captions and %d latents in %.0f s, encoders released",
            f"{label}: cache" if label else "cache",
            plan.root,
            texts,
            latents,
            time.monotonic() - started,
        )
    return FillStats(texts, latents, tuple(loaded))


Encoder = TypeVar("Encoder", bound=nn.Module)


def _with_encoder(
    load: Callable[[], Encoder], device: torch.device, dtype: str, what: str, work: Callable[[Encoder], int]
) -> int:
    """Load, check the dtype, run ``work``, and release the encoder whatever happens."""
    module = load().to(device)
    try:
        _check_dtype(module, dtype, what)
        return work(module)
    finally:
        release(module)


def load_text_embeddings(plan: CachePlan, prompts: Sequence[str]) -> TextEmbeddings:
    """Cached embeddings of ``prompts`` (e.g. ``[""]`` for caption dropout, or the sample prompts) as
    ``TextEmbeddings(txt [N, L, d_t5], y [N, d_clip])`` on the CPU, in the dtype they were encoded in."""
    missing = [p for p in prompts if p not in plan.text_keys]
    if missing:
        raise KeyError(f"prompts {missing[:3]} are not part of the cache plan; pass them as sample_prompts")
    entries = [plan.store.read_text(plan.text_keys[p]) for p in prompts]
    return TextEmbeddings(torch.stack([t for t, _ in entries]), torch.stack([y for _, y in entries]))
