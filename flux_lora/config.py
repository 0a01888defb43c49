"""The experiment configuration: one typed tree of dataclasses, loaded from YAML plus command-line overrides.

Sections: ``model`` (weights, quantization, memory), ``lora`` (what to train), ``data`` (images, captions,
buckets, cache), ``train`` (objective, optimizer, schedule, checkpoints, devices) and ``sample`` (preview images).
See ``configs/*.yaml``; every field can be overridden as ``--section.field value`` or ``--field value``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flux_lora import config_io
from flux_lora.dtypes import Quantize
from flux_lora.sampling import SIDE_MULTIPLE, TimestepSampling

DEFAULT_TARGETS = ("double_blocks.*", "single_blocks.*")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, column or setting."""


@dataclass
class DataConfig:
    """Where the training images and captions come from, how they are bucketed, and where the cache lives.

    Attributes:
        source: image folder, ``datasets`` save_to_disk folder, imagefolder with metadata, or dataset name.
        image_column / caption_column: columns of a ``datasets`` source (imagefolder: ``image`` / ``text``).
        split: split of a ``datasets`` source.
        caption_extension: caption file suffix in an image folder.
        default_caption: caption for images without one; ``None`` makes a missing caption an error.
        resolution: target side; buckets have an area close to ``resolution**2``.
        bucket_step: spacing of the bucket widths (a multiple of 16); larger means fewer, fuller buckets.
        max_aspect: longest bucket side over shortest; more extreme images are cropped to it.
        upscale: enlarge images smaller than their bucket (default: they get a bucket of their own size).
        crop: ``center`` or ``random`` (``crop_variants`` random crops per image are cached, one
            drawn per use).
        flip: also cache a mirrored copy of each crop and draw it half of the time.
        repeats: times each image appears per epoch.
        batch_size: images per batch, all from one bucket.
        drop_last: drop each bucket's last partial batch.
        num_workers: DataLoader workers (reading cached tensors only).
        shuffle / seed: per-epoch shuffling, deterministic from ``seed``; also seeds random-crop choice.
        cache_dir: folder of the content-keyed latent and embedding cache.
        encode_batch_size: images or captions per encoder call while filling the cache.
    """

    source: str = ""
    image_column: str = "image"
    caption_column: str = "text"
    split: str = "train"
    caption_extension: str = ".txt"
    default_caption: str | None = None
    resolution: int = 1024
    bucket_step: int = 16
    max_aspect: float = 4.0
    upscale: bool = False
    crop: str = "center"
    crop_variants: int = 4
    flip: bool = False
    repeats: int = 1
    batch_size: int = 1
    drop_last: bool = False
    num_workers: int = 0
    shuffle: bool = True
    seed: int = 0
    cache_dir: str = ".cache/flux-lora"
    encode_batch_size: int = 4

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> DataError:
            return DataError(f"data.{name} must be {rule}, got {getattr(self, name)!r}")

        if self.resolution < SIDE_MULTIPLE or self.resolution % SIDE_MULTIPLE:
            raise bad("resolution", f"a positive multiple of {SIDE_MULTIPLE}")
        if self.bucket_step < SIDE_MULTIPLE or self.bucket_step % SIDE_MULTIPLE:
            raise bad("bucket_step", f"a positive multiple of {SIDE_MULTIPLE}")
        if not self.max_aspect >= 1.0:
            raise bad("max_aspect", ">= 1")
        if self.crop not in ("center", "random"):
            raise bad("crop", "'center' or 'random'")
        for name in ("crop_variants", "repeats", "batch_size", "encode_batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.num_workers < 0:
            raise bad("num_workers", ">= 0")
        if not self.caption_extension.startswith("."):
            raise bad("caption_extension", "a suffix starting with '.'")
        if not self.cache_dir:
            raise bad("cache_dir", "a folder path")


@dataclass
class LoraConfig:
    """What to train: ``rank`` and ``alpha`` (scale = alpha / rank, or alpha / sqrt(rank) with ``use_rslora``),
    ``dropout`` on the adapter input, ``init`` of A ("default": Kaiming-uniform A and zero B, "gaussian"), and
    ``targets``, globs over BFL module names selecting Linear layers."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    init: Literal["default", "gaussian"] = "default"
    use_rslora: bool = False
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("default", "gaussian"):
            raise ValueError(f"lora.init must be 'default' or 'gaussian', got {self.init!r}")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one module glob, e.g. 'double_blocks.*'")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class ModelConfig:
    """Which FLUX.1 and how it is held in memory."""

    source: str = "AI-ModelScope/FLUX.1-dev"  # a local folder in the official layout or a ModelScope id
    preset: str | None = None  # architecture preset; None infers it from the checkpoint
    quantize: Quantize | None = None  # store the DiT's block Linears in fp8
    quant_policy: Literal["blocks", "all"] = "blocks"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPUs, float32 on CPUs
    gradient_checkpointing: bool = True  # recompute each block in backward
    compile: bool = False  # torch.compile each block
    cache_dir: str | None = None  # where ModelScope downloads go
    tiny_if_missing: bool = False  # write a tiny random model to `source` when it does not exist (CPU demos)
    tiny_variant: Literal["dev", "schnell"] = "dev"


@dataclass
class TrainConfig:
    """Objective, optimizer, schedule, checkpoints and devices."""

    max_steps: int = 1000
    seed: int = 42
    learning_rate: float = 1e-4
    optimizer: str = "torch.optim.AdamW"  # any optimizer class by import path
    optimizer_args: dict = field(default_factory=lambda: {"weight_decay": 0.01})
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine ends at learning_rate * min_lr_ratio
    gradient_clip: float | None = 1.0
    accumulate_grad_batches: int = 1
    timestep_sampling: TimestepSampling = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0
    shift: Literal["flux", "fixed", "none"] = "flux"  # flux: resolution-dependent, as the sampler
    fixed_shift: float = 3.0
    guidance: float = 1.0  # embedded guidance fed to dev while training
    caption_dropout: float = 0.0  # probability of training on the empty caption
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    precision: Literal["auto", "bf16-mixed", "16-mixed", "32-true"] = "auto"  # auto: bf16-mixed on GPUs
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", a count such as "2", or a list such as "0,1"
    num_nodes: int = 1
    strategy: str = "auto"  # Lightning strategy; several devices use DDP
    save_every_n_steps: int = 250  # LoRA file (0: only at the end)
    checkpoint_every_n_steps: int = 250  # resumable training state (0: only at the end)
    log_every_n_steps: int = 10
    resume: bool = True  # continue from the newest checkpoint; false moves the old run aside (previous-<time>/)
    init_lora: str | None = None  # start from this LoRA file (any readable layout) instead of zeros

    def __post_init__(self) -> None:
        for name in ("max_steps", "accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if "." not in self.optimizer:
            raise ValueError(f"train.optimizer must be an import path (torch.optim.AdamW), got {self.optimizer!r}")
        check_optimizer(self.optimizer, self.optimizer_args, self.learning_rate)


def check_optimizer(path: str, args: dict, lr: float) -> None:
    """Import the optimizer class and build it once on a one-element parameter, so an unknown class or bad
    ``optimizer_args`` stop the run when the config loads, not after caching and model loading."""
    import importlib

    import torch

    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"train.optimizer {path!r} cannot be imported ({type(e).__name__}: {e})") from None
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise ValueError(f"train.optimizer {path!r} is not a torch.optim.Optimizer class")
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ValueError(f"train.optimizer_args must be a mapping of argument names to values, got {args!r}")
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], lr=lr, **args)  # type: ignore[call-arg]
    except Exception as e:  # TypeError (unknown argument), ValueError, IndexError (betas: [0.9]), ...
        raise ValueError(
            f"train.optimizer_args {args!r} are not accepted by {path} ({type(e).__name__}: {e})"
        ) from None


@dataclass
class SampleConfig:
    """Preview images generated from cached prompt embeddings while training."""

    prompts: list[str] = field(default_factory=list)
    every_n_steps: int = 0  # 0: only at the end (and never when there are no prompts)
    steps: int | None = None  # None: the model's default (28 dev, 4 schnell)
    guidance: float = 3.5
    height: int = 1024
    width: int = 1024
    seed: int = 0


@dataclass
class ExperimentConfig:
    name: str = "flux-lora"
    output_dir: str = "outputs/flux-lora"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment and apply command-line overrides (strict: unknown keys and bad values raise)."""
    return config_io.load(ExperimentConfig, path, overrides)


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    return config_io.dump(cfg, path)
