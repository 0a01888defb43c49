"""The experiment configuration: one typed tree of dataclasses, loaded from YAML plus command-line overrides.

Sections: ``model`` (weights, quantization, memory), ``lora`` (what to train), ``data`` (images, captions,
buckets, cache), ``train`` (objective, optimizer, schedule, checkpoints, devices) and ``sample`` (preview images).
See ``configs/*.yaml``; every field can be overridden as ``--section.field value`` or ``--field value``. Each
field carries its one-line description in ``metadata["help"]``, which ``train.py --help`` lists.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from flux_lora import config_io
from flux_lora.names import SIDE_MULTIPLE, Quantize, TimestepSampling

DEFAULT_TARGETS = ("double_blocks.*", "single_blocks.*")
AdapterKind = Literal["lora", "lokr", "loha", "dora"]
ADAPTER_KINDS: tuple[str, ...] = ("lora", "lokr", "loha", "dora")


LrSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]

# train.optimizer names: the class's import path, and the package of the `optim` extra it needs (None: a dependency).
OPTIMIZERS: dict[str, tuple[str, str | None]] = {
    "adamw": ("torch.optim.AdamW", None),
    "adam": ("torch.optim.Adam", None),
    "sgd": ("torch.optim.SGD", None),
    "adamw8bit": ("bitsandbytes.optim.AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt.Prodigy", "prodigyopt"),
    "adafactor": ("transformers.optimization.Adafactor", None),
    "lion": ("lion_pytorch.Lion", "lion_pytorch"),
    "schedulefree_adamw": ("schedulefree.AdamWScheduleFree", "schedulefree"),
}
# Arguments a named optimizer needs to honour an explicit learning rate; optimizer_args override them.
OPTIMIZER_DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    "adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False},
}


def optimizer_path(name: str) -> str:
    """The import path of a ``train.optimizer`` name (``adamw``, ``prodigy``, ...); an import path as it is."""
    return OPTIMIZERS[name.lower()][0] if name.lower() in OPTIMIZERS else name


def check_optimizer(name: str, args: dict[str, Any], lr: float) -> None:
    """At config time: a known name whose package is installed (else the extra to install) or an import path,
    and the class built once on a one-element parameter, so an unknown class or bad ``optimizer_args`` stop the
    run when the config loads, not after caching and model loading."""
    import torch

    if name.lower() in OPTIMIZERS:
        package = OPTIMIZERS[name.lower()][1]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"train.optimizer {name!r} needs the {package} package: pip install 'flux-lora[optim]'")
    elif "." not in name:
        raise ValueError(f"train.optimizer {name!r} is unknown: use one of {', '.join(OPTIMIZERS)} or an import path")
    path = optimizer_path(name)
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"train.optimizer {path!r} cannot be imported ({type(e).__name__}: {e})") from None
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise ValueError(f"train.optimizer {path!r} is not a torch.optim.Optimizer class")
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ValueError(f"train.optimizer_args must be a mapping of argument names to values, got {args!r}")
    try:
        kwargs = {**OPTIMIZER_DEFAULT_ARGS.get(name.lower(), {}), **args}
        cls([torch.nn.Parameter(torch.zeros(1))], lr=lr, **kwargs)  # type: ignore[call-arg]
    except Exception as e:  # TypeError (unknown argument), ValueError, IndexError (betas: [0.9]), ...
        raise ValueError(
            f"train.optimizer_args {args!r} are not accepted by {path} ({type(e).__name__}: {e})"
        ) from None


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, column or setting."""


def _doc(help: str, default: Any = MISSING, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its one-line description, which ``train.py --help`` shows."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RegularizationImages:
    """Regularization images the base model draws once, before training, from class prompts (the ``generate``
    of a ``data.datasets`` entry). They are written as PNGs with .txt captions into a folder under
    ``data.cache_dir/regularization/`` keyed by the model's fingerprint, the prompts, seeds and sampler settings,
    so a rerun reuses them and loads no sampler. Cost: one generation (images x steps DiT calls, once) and the
    training steps the extra images take."""

    prompts: list[str] = _doc(
        "class prompts of what the LoRA must not change, e.g. 'a circle', 'a square on the left'", factory=list
    )
    images_per_prompt: int = _doc("images drawn per prompt, each with its own seed", 1)
    seed: int = _doc("seed of the first image; image k of the set (prompt by prompt) uses seed + k", 0)
    steps: int | None = _doc("denoising steps; null: the model's default (28 dev, 4 schnell)", None)
    guidance: float = _doc("embedded guidance of the generation", 3.5)
    size: int | None = _doc("side in px of the square images; null: the dataset's largest resolution", None)
    batch_size: int = _doc("images per DiT call while generating", 4)

    def __post_init__(self) -> None:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError(f"prompts must be a list of non-empty class prompts, got {self.prompts!r}")
        for name in ("images_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.size is not None and (self.size < SIDE_MULTIPLE or self.size % SIDE_MULTIPLE):
            raise ValueError(f"size must be a positive multiple of {SIDE_MULTIPLE}, got {self.size}")


# Fields of a data.datasets entry that the data section does not have: they shape the entry, not the scan.
DATASET_ONLY = ("regularization", "generate")


@dataclass
class DatasetConfig:
    """One entry of ``data.datasets``. A field left null takes the data section's value, as kohya's [general]."""

    source: str = _doc("image folder, `datasets` folder or dataset name of this dataset", "")
    image_column: str | None = _doc("as data.image_column; null: the data section's", None)
    caption_column: str | None = _doc("as data.caption_column; null: the data section's", None)
    split: str | None = _doc("as data.split; null: the data section's", None)
    streaming: bool | None = _doc("as data.streaming; null: the data section's", None)
    caption_extension: str | None = _doc("as data.caption_extension; null: the data section's", None)
    default_caption: str | None = _doc("as data.default_caption; null: the data section's", None)
    trigger_word: str | None = _doc("as data.trigger_word; null: the data section's", None)
    repeats: int | None = _doc("as data.repeats; null: the data section's", None)
    resolution: int | list[int] | None = _doc("as data.resolution; null: the data section's", None)
    loss_weight: float | None = _doc("as data.loss_weight; null: the data section's", None)
    regularization: bool = _doc(
        "regularization (prior-preservation) images of the base model's classes, as kohya's reg folders: "
        "trained without data.trigger_word (unless this entry sets one), at this entry's loss_weight and repeats",
        False,
    )
    generate: RegularizationImages | None = _doc(
        "make this entry's images with the base model instead of reading source (implies regularization): "
        "prompts, images_per_prompt, seed, steps, guidance, size, batch_size; generated once, then reused",
        None,
    )

    def __post_init__(self) -> None:
        if self.generate is not None:
            if self.source:
                raise DataError(f"set source (your own images) or generate, not both; got source {self.source!r}")
            self.regularization = True


@dataclass
class DataConfig:
    """The training data: one dataset (``source`` ... ``resolution``) or several (``datasets``, whose entries
    default to those fields), and what they share: buckets, crops, batches and the cache."""

    source: str = _doc("image folder, `datasets` save_to_disk folder, imagefolder with metadata, or dataset name", "")
    image_column: str = _doc("image column of a `datasets` source", "image")
    caption_column: str = _doc("caption column of a `datasets` source (imagefolder: `text`)", "text")
    split: str = _doc("split of a `datasets` source", "train")
    streaming: bool = _doc(
        "read source as it trains, never whole on disk: a `datasets` dataset name (streaming=True), or WebDataset "
        "tar shards by path, glob or URL (`.tar`: image and caption columns are the file suffixes, e.g. jpg, txt); "
        "each chunk is encoded into the cache as it arrives, then training reads the cache",
        False,
    )
    caption_extension: str = _doc("caption file suffix beside each image in a folder", ".txt")
    default_caption: str | None = _doc("caption for images without one; null makes a missing caption an error", None)
    trigger_word: str | None = _doc(
        "replaces [trigger] in captions and sample prompts, else is prepended as 'word, caption'", None
    )
    repeats: int = _doc("times each image appears per epoch (times N in a kohya N_name/ subfolder)", 1)
    resolution: int | list[int] = _doc(
        "bucket area is resolution**2; a list such as [512, 768, 1024] puts each image in a bucket at each", 1024
    )
    loss_weight: float = _doc(
        "weight of these images' loss (per data.datasets entry, e.g. 0.5 for regularization images)", 1.0
    )
    datasets: list[DatasetConfig] = _doc(
        "several datasets: entries of source, image_column, caption_column, split, streaming, caption_extension, "
        "default_caption, trigger_word, repeats, resolution, loss_weight, regularization, generate; what an entry "
        "leaves out is the field above",
        factory=list,
    )
    references: str | None = _doc(
        "FLUX.1 Kontext pairs: folder of reference images matched to the source's images (targets, captioned with "
        "the instruction) by relative file name, any extension; null: no references",
        None,
    )
    bucket_step: int = _doc("spacing of bucket widths (a multiple of 16); larger means fewer, fuller buckets", 16)
    max_aspect: float = _doc("longest bucket side over shortest; more extreme images are cropped to it", 4.0)
    upscale: bool = _doc("enlarge images smaller than their bucket (default: they get a bucket of their own)", False)
    crop: str = _doc("center, or random (crop_variants random crops are cached, one drawn per use)", "center")
    crop_variants: int = _doc("random crops cached per image and resolution (crop: random)", 4)
    flip: bool = _doc("also cache a mirrored copy of each crop and draw it half of the time", False)
    batch_size: int = _doc("images per batch, all from one bucket", 1)
    drop_last: bool = _doc("drop each bucket's last partial batch", False)
    num_workers: int = _doc("DataLoader workers (they read cached tensors only)", 0)
    shuffle: bool = _doc("shuffle every epoch, deterministically from seed", True)
    seed: int = _doc("seeds shuffling and the choice of random crops", 0)
    cache_dir: str | None = _doc(
        "folder of the content-keyed latent and embedding cache; null: <output_dir>/cache", None
    )
    encode_batch_size: int = _doc("images or captions per encoder call while filling the cache", 4)
    masks: str | None = _doc(
        "loss masks: alpha (each image's alpha channel) or a folder of greyscale masks named as the images "
        "(white trains, black is ignored); null: none",
        None,
    )

    @property
    def resolutions(self) -> list[int]:
        return list(self.resolution) if isinstance(self.resolution, list) else [self.resolution]

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> DataError:
            return DataError(f"data.{name} must be {rule}, got {getattr(self, name)!r}")

        if not self.resolutions or any(r < SIDE_MULTIPLE or r % SIDE_MULTIPLE for r in self.resolutions):
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
        if self.cache_dir == "":
            raise bad("cache_dir", "a folder path (or null: <output_dir>/cache)")
        if not (math.isfinite(self.loss_weight) and self.loss_weight > 0):
            raise bad("loss_weight", "a number > 0")
        if self.masks and self.masks != "alpha" and not Path(self.masks).is_dir():
            raise bad("masks", "alpha or an existing folder of masks")
        if self.streaming and self.masks:
            raise DataError(f"data.masks is not supported with data.streaming (source {self.source!r})")
        self.dataset_configs()  # each entry of datasets, completed, must be valid too

    def dataset_configs(self) -> list[DataConfig]:
        """One complete DataConfig per dataset: each ``datasets`` entry with its null fields taken from this
        section, or this config itself when there are no entries."""
        out = []
        for i, d in enumerate(self.datasets):
            if not d.source and d.generate is None:
                raise DataError(f"data.datasets[{i}].source is empty: set it to an image folder or a dataset")
            own = {
                f.name: getattr(d, f.name)
                for f in fields(DatasetConfig)
                if getattr(d, f.name) is not None and f.name not in DATASET_ONLY
            }
            if d.regularization and d.trigger_word is None:
                own["trigger_word"] = None  # class images: the subject's trigger word is not theirs
            try:
                out.append(replace(self, datasets=[], **own))
            except DataError as e:
                raise DataError(f"data.datasets[{i}]: {e}") from None
        return out or [self]

    @property
    def cache_path(self) -> Path:
        """The cache folder (set by the experiment from its output folder when ``cache_dir`` is null)."""
        if self.cache_dir is None:
            raise DataError("data.cache_dir is not set: give a folder (an experiment config sets <output_dir>/cache)")
        return Path(self.cache_dir)

    @property
    def all_resolutions(self) -> list[int]:
        return sorted({r for d in self.dataset_configs() for r in d.resolutions})


@dataclass
class LoraConfig:
    """What to train (scale = alpha / rank, or alpha / sqrt(rank) with use_rslora), and where."""

    kind: AdapterKind = _doc(
        "adapter: lora, lokr (LyCORIS Kronecker), loha (LyCORIS Hadamard) or dora (LoRA with a trained per-row "
        "magnitude); all through peft, saved in the kohya / LyCORIS layout ComfyUI and Forge load",
        "lora",
    )
    rank: int = _doc("LoRA rank of every adapted Linear", 16)
    alpha: float = _doc("alpha; the update is scaled by alpha / rank", 16.0)
    dropout: float = _doc("dropout on the adapter input (lora, dora); lokr / loha: peft's module dropout", 0.0)
    init: Literal["default", "gaussian"] = _doc(
        "lora / dora: A's init, default (Kaiming-uniform A, zero B) or gaussian", "default"
    )
    use_rslora: bool = _doc("lora / dora: scale by alpha / sqrt(rank) (rank-stabilised LoRA)", False)
    lokr_factor: int = _doc(
        "lokr: Kronecker factor size (peft's decompose_factor; rank is the decomposed factor's); -1 splits each "
        "side near its square root",
        -1,
    )
    decompose_both: bool = _doc("lokr: also decompose the first (small) Kronecker factor into two rank-r ones", False)
    targets: list[str] = _doc(
        "globs over BFL module names selecting the Linear layers to adapt", factory=lambda: list(DEFAULT_TARGETS)
    )
    double_blocks: list[int] | str | None = _doc(
        "train only these double blocks: indices or ranges, e.g. '0-9', '0-3,8' or [0, 5, 7]; null: all", None
    )
    single_blocks: list[int] | str | None = _doc("train only these single blocks, as double_blocks; null: all", None)
    rank_pattern: dict[str, int] = _doc(
        "per-module ranks: glob over BFL module names -> rank, first match wins, e.g. {'*_attn.*': 32, "
        "'*_mlp.*': 8}; unmatched modules take rank",
        factory=dict,
    )
    alpha_pattern: dict[str, float] = _doc(
        "per-module alphas: glob -> alpha, as rank_pattern; unmatched take alpha", factory=dict
    )

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"lora.kind must be one of {', '.join(ADAPTER_KINDS)}, got {self.kind!r}")
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
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"lora.lokr_factor must be -1 or a positive size, got {self.lokr_factor}")
        for name in ("double_blocks", "single_blocks"):
            block_indices(getattr(self, name), f"lora.{name}")  # syntax now; the model's depth when it is known
        for name, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            for glob, value in getattr(self, name).items():
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
                if not isinstance(glob, str) or not ok or (kind is int and value != int(value)):
                    raise ValueError(f"lora.{name} entry {glob!r}: {value!r} is not a positive {kind.__name__}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def block_indices(spec: list[int] | str | None, key: str, depth: int | None = None) -> list[int] | None:
    """``'0-3,8'`` / ``[0, 5]`` / None -> sorted indices (None: every block); raises ValueError naming ``key`` and the
    value when it is not indices and ranges, or (given ``depth``) when an index is not below ``depth``."""
    if spec is None:
        return None
    parts = [str(p).strip() for p in spec] if isinstance(spec, list) else str(spec).split(",")
    out: set[int] = set()
    for part in parts:
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ValueError(f"{key}: {part!r} in {spec!r} is not a block index or a range a-b (a <= b)")
        out.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    if not out:
        raise ValueError(f"{key}: {spec!r} names no block; use null for all blocks")
    if depth is not None and max(out) >= depth:
        raise ValueError(f"{key}: {spec!r} names block {max(out)}, but the model has {depth} (0-{depth - 1})")
    return sorted(out)


@dataclass
class ModelConfig:
    """Which FLUX.1 and how it is held in memory."""

    source: str = _doc(
        "local folder (official or diffusers layout), hf:owner/name, ms:owner/name, or owner/name on model.hub",
        "AI-ModelScope/FLUX.1-dev",
    )
    hub: Literal["huggingface", "modelscope"] = _doc("where a bare owner/name source is downloaded from", "modelscope")
    revision: str | None = _doc("hub revision (branch, tag or commit) to download; null: the default branch", None)
    preset: str | None = _doc("architecture preset; null infers it from the checkpoint", None)
    quantize: Quantize | None = _doc("store the DiT's block Linears in fp8", None)
    quant_policy: Literal["blocks", "all"] = _doc("which Linears quantize touches: the blocks', or all", "blocks")
    fp8_scale: Literal["row", "none"] = _doc(
        "fp8 weight scale: row (a power of two per output row, the default) or none (a plain cast, for comparison)",
        "row",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _doc(
        "compute dtype; auto: bf16 on GPUs, float32 on CPUs", "auto"
    )
    gradient_checkpointing: bool = _doc("recompute each block in backward (less memory, more time)", True)
    selective_checkpointing: bool = _doc(
        "with gradient_checkpointing: keep attention outputs, recompute the rest (~1.6 GB more at 1024 px)", False
    )
    blocks_to_swap: int = _doc(
        "keep the last N DiT blocks in host memory, streamed to the GPU while they run (12-16 GB cards; needs "
        "gradient_checkpointing, runs eager)",
        0,
    )
    compile: bool | Literal["auto"] = _doc(
        "torch.compile each block; auto: on CUDA GPUs of compute capability >= 8.9, eager elsewhere", "auto"
    )
    fp8_matmul: bool | Literal["auto"] = _doc(
        "fp8 GEMMs for the block Linears of an fp8 DiT; auto: where compiled on capability >= 8.9", "auto"
    )
    cache_dir: str | None = _doc("download cache; null: the hub's own (HF_HOME, MODELSCOPE_CACHE)", None)
    tiny_if_missing: bool = _doc("write a tiny random model to source when it does not exist (CPU demos)", False)
    tiny_variant: Literal["dev", "schnell", "kontext"] = _doc("which tiny model tiny_if_missing writes", "dev")


@dataclass
class TrainConfig:
    """Objective, optimizer, schedule, checkpoints and devices."""

    max_steps: int = _doc("optimizer steps to train", 1000)
    seed: int = _doc("seed of noise, timesteps and LoRA init", 42)
    learning_rate: float = _doc("peak learning rate", 1e-4)
    optimizer: str = _doc(
        "adamw, adamw8bit, prodigy, adafactor, lion, schedulefree_adamw, or a class by import path", "adamw"
    )
    optimizer_args: dict[str, Any] = _doc("keyword arguments of the optimizer", factory=lambda: {"weight_decay": 0.01})
    lr_scheduler: LrSchedule = _doc(
        "transformers.get_scheduler schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
        "polynomial",
        "constant",
    )
    warmup_steps: int = _doc("linear warmup steps (lr 0 at step 0)", 0)
    min_lr_ratio: float = _doc("cosine and polynomial end at learning_rate * min_lr_ratio", 0.0)
    lr_cycles: int = _doc("hard restarts of cosine_with_restarts", 1)
    lr_power: float = _doc("power of the polynomial decay", 1.0)
    gradient_clip: float | None = _doc("clip the gradient norm to this; null: no clipping", 1.0)
    accumulate_grad_batches: int = _doc("batches per optimizer step", 1)
    timestep_sampling: TimestepSampling = _doc("density of training timesteps", "logit_normal")
    logit_mean: float = _doc("mean of logit_normal sampling", 0.0)
    logit_std: float = _doc("standard deviation of logit_normal sampling", 1.0)
    sigmoid_scale: float = _doc("scale of sigmoid sampling", 1.0)
    shift: Literal["flux", "fixed", "none"] = _doc("timestep shift; flux: resolution-dependent, as the sampler", "flux")
    fixed_shift: float = _doc("the shift when shift is fixed", 3.0)
    guidance: float = _doc("embedded guidance fed to dev while training", 1.0)
    caption_dropout: float = _doc("probability of training on the empty caption", 0.0)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = _doc("per-timestep loss weight", "none")
    precision: Literal["auto", "bf16-mixed", "16-mixed", "32-true"] = _doc(
        "Lightning precision; auto: bf16-mixed on GPUs, 32-true on CPUs", "auto"
    )
    accelerator: str = _doc("Lightning accelerator: auto, gpu, cpu", "auto")
    devices: str = _doc("auto, a count such as 2, or a list such as 0,1", "auto")
    num_nodes: int = _doc("machines taking part", 1)
    strategy: str = _doc("Lightning strategy; several devices use DDP", "auto")
    save_every_n_steps: int = _doc("write the LoRA file every N steps (0: only at the end)", 250)
    checkpoint_every_n_steps: int = _doc("write resumable training state every N steps (0: only at the end)", 250)
    log_every_n_steps: int = _doc("log metrics every N steps", 10)
    logger: Literal["tensorboard", "wandb", "csv"] = _doc(
        "where metrics go: tensorboard (CSV when it is not installed), wandb (WANDB_MODE=offline works), csv",
        "tensorboard",
    )
    resume: bool = _doc(
        "continue from the newest checkpoint; false moves the old run aside into output_dir/previous-<time>/", True
    )
    init_lora: str | None = _doc("start from this LoRA file (any readable layout) instead of zeros", None)

    def __post_init__(self) -> None:
        for name in ("max_steps", "accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check_optimizer(self.optimizer, self.optimizer_args, self.learning_rate)
        if not 0 <= self.min_lr_ratio < 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1), got {self.min_lr_ratio}")
        if self.lr_cycles < 1:
            raise ValueError(f"train.lr_cycles must be >= 1, got {self.lr_cycles}")
        if self.logger == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ValueError("train.logger wandb needs the wandb package: pip install wandb")


@dataclass
class SamplePrompt:
    """One preview with its own settings; a field left null takes the sample section's value."""

    prompt: str = _doc("the prompt ([trigger] and data.trigger_word apply)", "")
    negative_prompt: str = _doc("negative prompt, used with true_cfg != 1", "")
    true_cfg: float = _doc("true classifier-free guidance scale (1: off)", 1.0)
    seed: int | None = _doc("seed of this preview's noise", None)
    steps: int | None = _doc("denoising steps of this preview", None)
    guidance: float | None = _doc("embedded guidance of this preview", None)
    height: int | None = _doc("height in pixels", None)
    width: int | None = _doc("width in pixels", None)
    keep: bool = _doc(
        "a keep preview: something the LoRA must leave as the base model draws it (sample.keep_prompts sets it; "
        "the toy scorer reports these apart)",
        False,
    )
    reference: str | None = _doc(
        "FLUX.1 Kontext: the image this preview edits, a path (relative to the working directory, as data.source), "
        "drawn as pipe(prompt, image=reference) at the preview's height and width; null: text to image",
        None,
    )
    reference_size: Literal["preferred", "keep"] = _doc(
        "the reference is encoded at the Kontext resolution nearest its aspect ratio (preferred, as BFL and "
        "diffusers) or at its own size (keep), as generate.py --reference-size",
        "preferred",
    )


@dataclass
class SampleConfig:
    """Preview images generated from cached prompt embeddings while training."""

    prompts: list[str | SamplePrompt] = _doc(
        "preview prompts: text, or a mapping with its own prompt, negative_prompt, true_cfg, seed, steps, guidance, "
        "height, width, and for FLUX.1 Kontext reference (an image to edit) and reference_size",
        factory=list,
    )
    keep_prompts: list[str | SamplePrompt] = _doc(
        "keep previews, as prompts: what the LoRA must not change (no trigger word is added); drawn after the "
        "prompts, recorded as keep, so the step-0 images are the base model's own and bleeding shows",
        factory=list,
    )
    every_n_steps: int = _doc("sample every N steps (0: only at the end; never without prompts)", 0)
    at_start: bool = _doc("also sample before the first step: the baseline the LoRA is judged against", True)
    steps: int | None = _doc("denoising steps; null: the model's default (28 dev, 4 schnell)", None)
    guidance: float = _doc("embedded guidance of the previews", 3.5)
    height: int = _doc("preview height in pixels", 1024)
    width: int = _doc("preview width in pixels", 1024)
    seed: int = _doc("seed of the preview noise", 0)

    def resolved(self) -> list[SamplePrompt]:
        """Every preview (the prompts, then the keep prompts, marked ``keep``) as a :class:`SamplePrompt` with the
        section's values filled in."""
        out = []
        items = [(i, False) for i in self.prompts] + [(i, True) for i in self.keep_prompts]
        for item, keep in items:
            p = SamplePrompt(prompt=item) if isinstance(item, str) else item
            p = replace(p, keep=p.keep or keep)
            out.append(
                replace(
                    p,
                    seed=self.seed if p.seed is None else p.seed,
                    steps=self.steps if p.steps is None else p.steps,
                    guidance=self.guidance if p.guidance is None else p.guidance,
                    height=self.height if p.height is None else p.height,
                    width=self.width if p.width is None else p.width,
                )
            )
        return out


@dataclass
class EmaConfig:
    """An fp32 exponential moving average of the LoRA weights only, saved as output_dir/<name>_ema.safetensors."""

    enabled: bool = _doc("keep the EMA of the adapters", False)
    decay: float = _doc("ema = decay * ema + (1 - decay) * weights at each update", 0.999)
    every_n_steps: int = _doc("update the EMA every N optimizer steps", 1)
    device: Literal["gpu", "cpu"] = _doc("where the EMA lives: gpu (the training device) or cpu (host memory)", "gpu")
    use_for_samples: bool = _doc("generate the preview samples with the EMA weights", False)

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")
        if self.every_n_steps < 1:
            raise ValueError(f"ema.every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.device not in ("gpu", "cpu"):
            raise ValueError(f"ema.device must be 'gpu' or 'cpu', got {self.device!r}")


@dataclass
class ValidationConfig:
    """A validation loss on held-out images: fixed timesteps and fixed noise, so it is comparable across steps."""

    source: str | None = _doc("held-out image folder (captions as data's); null: none, or see fraction", None)
    fraction: float = _doc("hold out this fraction of the training images instead (chosen by content hash)", 0.0)
    every_n_steps: int = _doc("score the held-out images every N steps and at the end (0: never)", 0)
    timesteps: list[float] = _doc("flow times each image is scored at", factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = _doc("seed of the fixed noise", 0)

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ValueError(f"validation.fraction must be in [0, 1), got {self.fraction}")
        if self.source and self.fraction:
            raise ValueError("validation: set source or fraction, not both")
        if not self.timesteps or not all(0 < t <= 1 for t in self.timesteps):
            raise ValueError(f"validation.timesteps must be flow times in (0, 1], got {self.timesteps}")
        if self.every_n_steps < 0:
            raise ValueError(f"validation.every_n_steps must be >= 0, got {self.every_n_steps}")

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0 and bool(self.source or self.fraction)


@dataclass
class PreservationConfig:
    """Output preservation (ai-toolkit's differential output preservation): keeps what the LoRA is not meant to
    change. Each step also pairs the batch's noisy latents and times with preservation prompts and adds
    ``output_weight`` times the MSE between the adapted model's prediction and the frozen base's (adapters off,
    no gradient) on those same inputs. The prompts: ``prompts`` (one drawn per sample), or each sample's own
    caption with ``replace_word`` replaced by one of ``replacements`` (drawn per sample). Cost: one more forward
    of the base and one more forward and backward of the adapted model per step (about 2.3x the step time)."""

    output_weight: float = _doc("weight of the output-preservation loss (0: off); costs ~2.3x the step time", 0.0)
    prompts: list[str] = _doc(
        "preservation prompts: what must stay as the base model draws it (no trigger word added; e.g. the class "
        "without the trigger); each sample of a step is paired with one, drawn per step",
        factory=list,
    )
    replace_word: str | None = _doc(
        "instead of prompts: each sample's own caption with this word (the trigger or concept word) replaced",
        None,
    )
    replacements: list[str] = _doc(
        "what replace_word becomes (the class word, or words it must not turn into); one drawn per sample; "
        "empty: the word is removed",
        factory=list,
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.output_weight) and self.output_weight >= 0):
            raise ValueError(f"preservation.output_weight must be >= 0, got {self.output_weight}")
        if self.prompts and self.replace_word:
            raise ValueError("preservation: set prompts or replace_word, not both")
        if self.output_weight > 0 and not self.prompts and not self.replace_word:
            raise ValueError(
                "preservation.output_weight > 0 needs preservation.prompts or preservation.replace_word "
                "(what the LoRA must keep)"
            )
        if any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ValueError(f"preservation.prompts must be non-empty texts, got {self.prompts!r}")
        if self.replace_word is not None and not self.replace_word.strip():
            raise ValueError("preservation.replace_word must be a word, got an empty text")

    @property
    def enabled(self) -> bool:
        return self.output_weight > 0

    @property
    def per_caption(self) -> bool:
        """Whether the preservation prompts are each sample's own caption with a word replaced."""
        return self.enabled and bool(self.replace_word)

    def caption_prompts(self, caption: str) -> list[str]:
        """``caption`` with ``replace_word`` (a whole word, any case) replaced by each of ``replacements`` (or
        removed), spaces and commas tidied; ``[]`` when the caption does not hold the word."""
        assert self.replace_word is not None
        pattern = re.compile(rf"\b{re.escape(self.replace_word.strip())}\b", re.IGNORECASE)
        if not pattern.search(caption):
            return []
        out = []
        for word in self.replacements or [""]:
            text = pattern.sub(word.replace("\\", "\\\\"), caption)
            text = re.sub(r"\s+([,.])", r"\1", re.sub(r"\s{2,}", " ", text)).strip(" ,")
            out.append(text)
        return out


SAVE_DTYPES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class SaveConfig:
    """How LoRA files are written (when: train.save_every_n_steps)."""

    dtype: Literal["bf16", "fp16", "fp32"] = _doc(
        "dtype of the LoRA matrices in saved files (bf16: half of fp32)", "bf16"
    )
    keep_last: int = _doc("intermediate LoRA files (output_dir/lora) kept, the newest; 0 keeps all", 0)
    keep_checkpoints: int = _doc(
        "resumable checkpoints (adapters + optimizer state) kept in output_dir/checkpoints, the newest; >= 1", 2
    )

    def __post_init__(self) -> None:
        if self.dtype not in SAVE_DTYPES:
            raise ValueError(f"save.dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.dtype!r}")
        if self.keep_last < 0:
            raise ValueError(f"save.keep_last must be >= 0, got {self.keep_last}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"save.keep_checkpoints must be >= 1 (resume needs one), got {self.keep_checkpoints}")


@dataclass
class ExperimentConfig:
    """One training run."""

    name: str = _doc("run name; the LoRA file is output_dir/<name>.safetensors", "flux-lora")
    output_dir: str = _doc("folder of the LoRA, checkpoints, samples, logs and config.yaml", "outputs/flux-lora")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    preservation: PreservationConfig = field(default_factory=PreservationConfig)

    def __post_init__(self) -> None:
        if self.preservation.enabled and self.model.blocks_to_swap:
            raise ValueError("preservation.output_weight > 0 does not run with model.blocks_to_swap yet: set one to 0")
        if self.data.cache_dir is None:  # the cache follows the run's folder unless set
            self.data = replace(self.data, cache_dir=str(self.output_path / "cache"))

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


# Names other trainers (kohya sd-scripts, ai-toolkit, SimpleTuner) use, pointed at ours in the error message.
FOREIGN_KEYS: dict[str, str] = {
    "network_dim": "lora.rank",
    "network_alpha": "lora.alpha",
    "linear": "lora.rank",
    "linear_alpha": "lora.alpha",
    "trigger_word": "data.trigger_word",
    "resolution": "data.resolution",
    "train_data_dir": "data.source",
    "folder_path": "data.source",
    "caption_ext": "data.caption_extension",
    "num_repeats": "data.repeats",
    "train_batch_size": "data.batch_size",
    "lr": "train.learning_rate",
    "unet_lr": "train.learning_rate",
    "steps": "train.max_steps (or sample.steps)",
    "max_train_steps": "train.max_steps",
    "lr_warmup_steps": "train.warmup_steps",
    "optimizer_type": "train.optimizer",
    "pretrained_model_name_or_path": "model.source",
    "name_or_path": "model.source",
    "output_name": "name",
    "sample_prompts": "sample.prompts",
    "fp8_base": "model.quantize: float8_e4m3fn",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "reg_data_dir": "a data.datasets entry with regularization: true",
    "prior_loss_weight": "loss_weight of a data.datasets entry with regularization: true",
}
FOREIGN_VALUES: dict[tuple[str, str], str] = {
    ("train.lr_scheduler", "cosine_with_min_lr"): "cosine with train.min_lr_ratio",
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment and apply command-line overrides (strict: unknown keys and bad values raise)."""
    return config_io.load(ExperimentConfig, path, overrides, foreign_keys=FOREIGN_KEYS, foreign_values=FOREIGN_VALUES)


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    return config_io.dump(cfg, path)
