"""Training batches from the cache: a Dataset of cached latents and embeddings, its collate, and a DataModule
that runs scan -> plan -> fill -> release before training.

The Dataset reads cache files only; no encoder is reachable from it. In one process ``prepare_data`` fills the
cache. Under DDP (the process group exists before Lightning calls ``prepare_data``) ``prepare_data`` does
nothing and ``setup``, which Lightning calls on every rank, has each rank encode its own share of the missing
entries and wait for the others without a collective (:mod:`flux_lora.data.shards`); it fails if anything is
still missing afterwards.
The batch sampler splits batches between ranks itself, so the Trainer must be built with
``use_distributed_sampler=False``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flux_lora.config import DataConfig
from flux_lora.data.buckets import BucketBatchSampler
from flux_lora.data.cache import (
    AutoEncoderSpec,
    CachePlan,
    CacheStore,
    FillStats,
    TextEncoderSpec,
    fill_cache,
    load_text_embeddings,
    plan_cache,
)
from flux_lora.data.pairs import plan_references, scan_references
from flux_lora.data.scan import ScannedData, scan_all
from flux_lora.data.shards import distributed, fill_distributed
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.text_encoders import TextEmbeddings, TextEncoders
from flux_lora.weights.loading import load_autoencoder

log = logging.getLogger(__name__)

Sample = dict[str, Any]  # tensors, and str under "caption" and "image"


class CachedDataset(Dataset[Sample]):
    """Cached training samples. ``dataset[(i, v)]`` is record ``i`` in its variant ``v`` (crop / flip), as a
    dict: ``latents [z, h, w]``, ``txt [L, d_t5]``, ``y [d_clip]`` (tensors in the cached dtype),
    ``caption`` (str) and ``image`` (the image's file name, for error messages); with ``weights`` (per-sample
    loss weights, given when some differ from 1), ``weight`` (a float32 scalar).
    A plain integer ``i`` means variant 0."""

    def __init__(
        self,
        root: str | Path,
        latent_keys: list[list[str]],
        text_keys: list[str],
        captions: list[str],
        names: list[str] | None = None,
        weights: list[float] | None = None,
        reference_keys: list[list[str]] | None = None,
    ):
        self.root, self.latent_keys = Path(root), latent_keys
        self.text_keys, self.captions = text_keys, captions
        self.names = names or [f"record {i}" for i in range(len(captions))]
        self.weights = weights
        self.reference_keys = reference_keys  # Kontext pairs: each variant's reference entry

    @classmethod
    def from_plan(cls, plan: CachePlan, references: CachePlan | None = None) -> CachedDataset:
        """The samples of a complete ``plan``; with ``references`` (:func:`flux_lora.data.pairs.plan_references`),
        each sample also holds its reference's latents under ``reference``."""
        if references is not None and not references.complete:
            raise RuntimeError(f"the cache {plan.root} lacks {len(references.missing_latents)} reference latents")
        if not plan.complete:
            raise RuntimeError(
                f"the cache {plan.root} is incomplete ({len(plan.missing_text)} captions, "
                f"{len(plan.missing_latents)} latents missing): fill it first"
            )
        return cls(
            plan.root,
            [[j.key for j in jobs] for jobs in plan.variants],
            [plan.text_keys[c] for c in plan.captions],
            list(plan.captions),
            list(plan.names) or None,
            list(plan.weights) if any(w != 1.0 for w in plan.weights) else None,
            None if references is None else [[j.key for j in jobs] for jobs in references.variants],
        )

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int | tuple[int, int]) -> Sample:
        i, v = (index, 0) if isinstance(index, int) else index
        store = CacheStore(self.root)
        txt, y = store.read_text(self.text_keys[i])
        entry = store.read_latent_entry(self.latent_keys[i][v])  # latents, and mask when training with masks
        if self.weights is not None:
            entry["weight"] = torch.tensor(self.weights[i], dtype=torch.float32)
        if self.reference_keys is not None:
            entry["reference"] = store.read_latent(self.reference_keys[i][v])
        return {**entry, "txt": txt, "y": y, "caption": self.captions[i], "image": self.names[i]}


def collate(samples: Sequence[Sample]) -> dict[str, Tensor | list[str]]:
    """Stack one bucket's samples: ``latents [B, z, h, w]``, ``txt [B, L, d_t5]``, ``y [B, d_clip]``, loss
    ``mask [B, h, w]`` (with data.masks), per-sample loss ``weight [B]`` (when the samples carry one),
    ``caption`` and ``image`` (lists of B str). Raises if the latents differ in size (samples from different
    buckets)."""
    shapes = {tuple(s["latents"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes latent sizes {sorted(shapes)}; batch with BucketBatchSampler")
    optional = ("mask", "weight", "reference")  # reference: a Kontext pair's reference latents [B, z, h, w]
    keys = ("latents", "txt", "y") + tuple(k for k in optional if all(k in s for s in samples))
    out: dict[str, Tensor | list[str]] = {k: torch.stack([s[k] for s in samples]) for k in keys}
    out["caption"] = [s["caption"] for s in samples]
    out["image"] = [str(s.get("image", "?")) for s in samples]
    return out


class ResumableDataLoader(DataLoader[Sample]):
    """A DataLoader over a :class:`BucketBatchSampler` that knows how many batches of the current epoch it has
    handed out. Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict`` on resume, so a run
    resumed mid-epoch continues with the next batch instead of restarting the epoch (a resume at an epoch's end
    starts the next epoch whole)."""

    batch_sampler: BucketBatchSampler

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._served = 0
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # torch types it as its own iterator class
        sampler = self.batch_sampler
        if self._resume_at is not None:
            epoch, served = self._resume_at
            sampler.skip = served if sampler.epoch == epoch else 0
            self._resume_at = None
        self._served = sampler.skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (state["epoch"], state["served"])


def make_dataloader(
    plan: CachePlan, cfg: DataConfig, rank: int = 0, world_size: int = 1, references: CachePlan | None = None
) -> DataLoader[Sample]:
    """The training DataLoader over a complete cache: this rank's bucketed batches (BucketBatchSampler)."""
    sampler = BucketBatchSampler(
        plan.buckets,
        [len(v) for v in plan.variants],
        batch_size=cfg.batch_size,
        repeats=plan.repeats or cfg.repeats,  # per sample: a dataset's repeats times its kohya folder's
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        drop_last=cfg.drop_last,
        rank=rank,
        world_size=world_size,
    )
    return ResumableDataLoader(
        CachedDataset.from_plan(plan, references),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # its own generator: creating an iterator must not draw from the global RNG, whose state a
        # resumed run restores (LoRA dropout draws from it)
        generator=torch.Generator().manual_seed(cfg.seed),
    )


class FluxDataModule(L.LightningDataModule):
    """Scan, cache and serve the training data.

    Args:
        cfg: the data config.
        text_spec / ae_spec: identities of the encoders (e.g. ``TextEncoderSpec.from_folder``), computed
            from files, so nothing is loaded to find out whether the cache is complete.
        load_text_encoders / load_autoencoder: build fresh encoders; called only if something is missing.
        sample_prompts: prompts whose embeddings the sampling callback needs (:meth:`sample_embeddings`).
        device: where to encode; default: the trainer's root device, else the CPU.
        scanned: the result of :func:`flux_lora.data.scan.scan_all` when the caller already has it (scanning hashes
            every image, so it is done once per process).
    """

    def __init__(
        self,
        cfg: DataConfig,
        text_spec: TextEncoderSpec,
        ae_spec: AutoEncoderSpec,
        load_text_encoders: Callable[[], TextEncoders],
        load_autoencoder: Callable[[], AutoEncoder],
        sample_prompts: Sequence[str] = (),
        device: str | torch.device | None = None,
        scanned: ScannedData | None = None,
    ):
        super().__init__()
        self.cfg, self.text_spec, self.ae_spec = cfg, text_spec, ae_spec
        self.load_text_encoders, self.load_autoencoder = load_text_encoders, load_autoencoder
        self.sample_prompts, self.device = list(sample_prompts), device
        self.plan: CachePlan | None = None
        self.fill_stats = FillStats()  # what this process encoded
        self.reference_plan: CachePlan | None = None  # Kontext pairs (data.references)
        self._scanned = scanned
        self._references: ScannedData | None = None

    @classmethod
    def from_model_folder(
        cls,
        cfg: DataConfig,
        folder: str | Path,
        max_length: int,
        dtype: torch.dtype,
        sample_prompts: Sequence[str] = (),
        device: str | torch.device | None = None,
        scanned: ScannedData | None = None,
    ) -> FluxDataModule:
        """Encoders in one FLUX.1-layout folder (``text_encoder*/``, ``tokenizer*/``, ``ae.safetensors``)."""
        folder = Path(folder)
        dm = cls(
            cfg,
            TextEncoderSpec.from_folder(folder, max_length, dtype),
            AutoEncoderSpec.from_folder(folder, dtype),
            _never,
            _never,
            sample_prompts,
            device,
            scanned,
        )
        # Picklable partials (for ddp_spawn) that load straight onto the encoding device, not via the host.
        dm.load_text_encoders = functools.partial(_folder_text_encoders, dm, folder, max_length, dtype)
        dm.load_autoencoder = functools.partial(_folder_autoencoder, dm, folder, dtype)
        return dm

    def scan(self) -> ScannedData:
        """Read and check the training data (once per process: every image's bytes are hashed)."""
        if self._scanned is None:
            self._scanned = scan_all(self.cfg)
        return self._scanned

    def references(self) -> ScannedData | None:
        """The reference of every scanned image (data.references), read and checked once; ``None`` without."""
        if self.cfg.references and self._references is None:
            self._references = scan_references(self.cfg, self.scan())
        return self._references

    def _plan(self, quiet: bool = False) -> tuple[ScannedData, CachePlan]:
        data = self.scan()
        return data, plan_cache(data, self.cfg, self.text_spec, self.ae_spec, self.sample_prompts, quiet=quiet)

    def _reference_plan(self, plan: CachePlan) -> CachePlan | None:
        refs = self.references()
        return None if refs is None else plan_references(plan, refs, self.ae_spec)

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def prepare_data(self) -> None:
        """Scan, plan, and fill what is missing (then the encoders are released); under DDP nothing: every rank
        fills its share in :meth:`setup`."""
        if distributed():
            return
        data, plan = self._plan()
        if not plan.complete:
            self.fill_stats = fill_cache(
                plan, data, self.load_text_encoders, self.load_autoencoder, self._device(), self.cfg.encode_batch_size
            )
        refs = self._reference_plan(plan)
        if refs is not None and not refs.complete:
            references = self.references()
            assert references is not None
            fill_cache(refs, references, _never, self.load_autoencoder, self._device(), self.cfg.encode_batch_size)

    def setup(self, stage: str | None = None) -> None:
        if distributed():  # every rank: plan (the summary once per node), encode its share, wait for the others
            data, plan = self._plan(quiet=self._local_rank() != 0)
            self.fill_stats = fill_distributed(
                plan, data, self.load_text_encoders, self.load_autoencoder, self._device(), self.cfg.encode_batch_size
            )
            plan = plan.refresh()
            refs = self._reference_plan(plan)
            if refs is not None and not refs.complete:
                references = self.references()
                assert references is not None
                fill_distributed(
                    refs, references, _never, self.load_autoencoder, self._device(), self.cfg.encode_batch_size
                )
        else:
            _, plan = self._plan(quiet=True)  # planned once more: its summary was logged in prepare_data
        if not plan.complete:
            raise RuntimeError(
                f"the cache {plan.root} is incomplete on this process after the fill; "
                "with several nodes, give each its own cache folder or share one filesystem"
            )
        self.plan = plan
        self.reference_plan = self._reference_plan(plan)
        if self.reference_plan is not None and not self.reference_plan.complete:
            raise RuntimeError(f"the cache {plan.root} lacks reference latents on this process after the fill")

    def _local_rank(self) -> int:
        trainer = self.trainer
        return trainer.local_rank if trainer is not None else int(os.environ.get("LOCAL_RANK", "0"))

    def train_dataloader(self) -> DataLoader[Sample]:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return make_dataloader(self._require_plan(), self.cfg, rank, world, self.reference_plan)

    def _require_plan(self) -> CachePlan:
        if self.plan is None:
            raise RuntimeError("call prepare_data() and setup() first")
        return self.plan

    def empty_embedding(self) -> TextEmbeddings:
        """The cached empty-caption embedding (caption dropout): ``txt [1, L, d_t5]``, ``y [1, d_clip]``."""
        return load_text_embeddings(self._require_plan(), [""])

    def sample_embeddings(self, prompts: Sequence[str] | None = None) -> TextEmbeddings:
        """The cached embeddings of ``prompts`` (default: the sample prompts), in order: ``txt [N, L, d_t5]``,
        ``y [N, d_clip]``; each must be a sample prompt or a caption of the plan."""
        return load_text_embeddings(self._require_plan(), self.sample_prompts if prompts is None else prompts)


def _never() -> NoReturn:
    raise AssertionError("replaced in FluxDataModule.from_model_folder")


def _folder_text_encoders(dm: FluxDataModule, folder: Path, max_length: int, dtype: torch.dtype) -> TextEncoders:
    return TextEncoders.from_folder(folder, max_length, dtype=dtype, device=dm._device())


def _folder_autoencoder(dm: FluxDataModule, folder: Path, dtype: torch.dtype) -> AutoEncoder:
    return load_autoencoder(folder, dtype=dtype, device=dm._device())
