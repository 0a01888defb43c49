"""Aspect-ratio buckets: which size each image trains at, how it is cropped, and batches that share a size.

Sizes are ``(width, height)`` in pixels with both sides multiples of :data:`SIDE_MULTIPLE` (the autoencoder's
8x downscale times the DiT's 2x2 patches). An image is never distorted: it is scaled by one factor until it
covers its bucket (:func:`image_crops`), then cropped (center or random) to the bucket, then maybe mirrored.

Upscaling policy: with ``upscale=False`` (the default) no image is scaled by more than 1. An image smaller
than the bucket its aspect ratio selects, in either side, gets a bucket of its own: its size at most the
target area, sides floored to multiples of 16. With ``upscale=True`` every image goes to one of the standard
buckets and small images are enlarged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from flux_lora.names import SIDE_MULTIPLE

Size = tuple[int, int]


def _round_to(x: float, step: int) -> int:
    return max(step, int(math.floor(x / step + 0.5)) * step)


def bucket_sizes(resolution: int, max_aspect: float = 4.0, step: int = SIDE_MULTIPLE) -> list[Size]:
    """The standard buckets at area ``resolution**2``: for each width on a grid of ``step`` up to
    ``resolution``, the height (a multiple of 16) that brings the area closest to the target, plus the
    transposed sizes. Buckets whose long side exceeds ``max_aspect`` times the short side are left out. Sorted
    by aspect ratio."""
    area = resolution * resolution
    sizes: set[Size] = set()
    for w in range(step, resolution + 1, step):
        h = _round_to(area / w, SIDE_MULTIPLE)
        if max(w, h) <= max_aspect * min(w, h):
            sizes.update({(w, h), (h, w)})
    return sorted(sizes, key=lambda s: (s[0] / s[1], s))


def _aspect_distance(size: Size, width: int, height: int) -> float:
    return abs(math.log(size[0] / size[1]) - math.log(width / height))


def cover_scale(width: int, height: int, bucket: Size) -> float:
    """The one scale factor at which a ``width x height`` image just covers ``bucket``."""
    return max(bucket[0] / width, bucket[1] / height)


def fit_bucket(width: int, height: int, resolution: int, max_aspect: float) -> Size:
    """The image's own bucket: its size scaled down to at most the target area (never up), sides floored to
    16, with the long side cut to ``max_aspect`` times the short one."""
    s = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    w = max(SIDE_MULTIPLE, int(width * s) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    h = max(SIDE_MULTIPLE, int(height * s) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    limit = lambda short: int(short * max_aspect) // SIDE_MULTIPLE * SIDE_MULTIPLE  # noqa: E731
    return (min(w, limit(h)), h) if w >= h else (w, min(h, limit(w)))


def choose_bucket(
    width: int, height: int, buckets: Sequence[Size], *, resolution: int, max_aspect: float, upscale: bool
) -> Size:
    """The bucket for a ``width x height`` image: the standard bucket of closest aspect ratio (in log space;
    ties go to the smaller bucket), or, without ``upscale``, :func:`fit_bucket` when that bucket would need
    enlarging."""
    best = min(buckets, key=lambda b: (_aspect_distance(b, width, height), b[0] * b[1], b))
    if upscale or cover_scale(width, height, best) <= 1.0:
        return best
    return fit_bucket(width, height, resolution, max_aspect)


@dataclass(frozen=True, slots=True)
class Crop:
    """How one image becomes one training crop: resize to ``resized`` (aspect kept), crop ``bucket`` at
    ``(left, top)``, then mirror when ``flip``."""

    bucket: Size
    resized: Size
    left: int
    top: int
    flip: bool = False

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The crop as PIL's ``(left, upper, right, lower)`` in the resized image."""
        return self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket": list(self.bucket),
            "resized": list(self.resized),
            "left": self.left,
            "top": self.top,
            "flip": self.flip,
        }


def resized_size(width: int, height: int, bucket: Size) -> Size:
    """The image size after scaling by :func:`cover_scale` (each side at least the bucket's)."""
    s = cover_scale(width, height, bucket)
    return max(bucket[0], round(width * s)), max(bucket[1], round(height * s))


def apply_crop(image: Image.Image, placement: Crop) -> Image.Image:
    """Resize (one scale factor, Lanczos), crop and optionally mirror ``image`` as ``placement`` says."""
    if image.size != placement.resized:
        image = image.resize(placement.resized, Image.Resampling.LANCZOS)
    image = image.crop(placement.box)
    return ImageOps.mirror(image) if placement.flip else image


def image_crops(
    width: int, height: int, bucket: Size, *, crop: str, variants: int, flip: bool, seed: str
) -> list[Crop]:
    """The cached training variants of one image: one center crop, or ``variants`` distinct random crops
    (fewer when the image has fewer possible positions) drawn by a generator seeded by ``seed`` (so every
    process and every run picks the same ones); each crop also mirrored when ``flip``."""
    rw, rh = resized_size(width, height, bucket)
    slack_x, slack_y = rw - bucket[0], rh - bucket[1]
    if crop == "center":
        offsets = [(slack_x // 2, slack_y // 2)]
    elif crop == "random":
        positions = (slack_x + 1) * (slack_y + 1)  # distinct offsets, drawn without replacement
        picks = random.Random(seed).sample(range(positions), min(variants, positions))
        offsets = [(p % (slack_x + 1), p // (slack_x + 1)) for p in picks]
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    flips = (False, True) if flip else (False,)
    return [Crop(bucket, (rw, rh), x, y, f) for x, y in offsets for f in flips]


class BucketBatchSampler:
    """Batches of ``(sample, variant)`` indices in which every sample shares one bucket, for ``DataLoader(
    batch_sampler=...)``.

    Each epoch (see :meth:`set_epoch`) every sample appears ``repeats`` times (one count for all, or one per
    sample), each time with a variant (crop
    / flip) drawn uniformly from its ``num_variants``. Samples are grouped by bucket, shuffled within the
    bucket and cut into batches of ``batch_size``; the batch order is shuffled across buckets. Everything
    derives from ``(seed, epoch)``, so all ranks build the same global batch list and rank ``r`` of
    ``world_size`` takes every ``world_size``-th batch from ``r``: ranks see disjoint samples and the same
    number of batches (as DDP needs).

    The last partial batch of each bucket is kept unless ``drop_last``: with few images per bucket dropping it
    would silently never train on them. When the batch count does not divide by ``world_size``, the first
    batches are repeated to pad it (as ``DistributedSampler`` does); with ``drop_last`` the excess batches are
    dropped.

    Under Lightning, pass ``rank=trainer.global_rank, world_size=trainer.world_size`` and use
    ``Trainer(use_distributed_sampler=False)``: Lightning cannot inject its ``DistributedSampler`` into this
    sampler and raises a TypeError in DDP if asked to. Lightning calls ``set_epoch`` on
    ``batch_sampler.sampler``, so ``sampler`` refers to this object itself.
    """

    def __init__(
        self,
        buckets: Sequence[Size],
        num_variants: Sequence[int],
        *,
        batch_size: int,
        repeats: int | Sequence[int] = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(buckets) != len(num_variants):
            raise ValueError(f"{len(buckets)} buckets for {len(num_variants)} samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        reps = [repeats] * len(buckets) if isinstance(repeats, int) else list(repeats)
        if len(reps) != len(buckets):
            raise ValueError(f"{len(reps)} repeat counts for {len(buckets)} samples")
        if batch_size < 1 or any(r < 1 for r in reps):
            raise ValueError(f"batch_size ({batch_size}) and repeats ({repeats}) must be >= 1")
        self.buckets, self.num_variants, self.sample_repeats = list(buckets), list(num_variants), reps
        self.batch_size, self.repeats, self.shuffle, self.seed = batch_size, repeats, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        self.skip = 0  # batches of this epoch already consumed before a resume
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> dict[Size, list[int]]:
        # copies interleaved ([a, b, a, b]): unshuffled batches do not pair an image with itself
        groups: dict[Size, list[int]] = {}
        for i, b in enumerate(self.buckets):
            groups.setdefault((b[0], b[1]), []).append(i)
        # per-sample repeats (kohya folders): round r holds the samples repeated more than r times
        reps = self.sample_repeats
        return {
            size: [i for r in range(max(reps[i] for i in members)) for i in members if reps[i] > r]
            for size, members in groups.items()
        }

    def global_batches(self) -> list[list[tuple[int, int]]]:
        """This epoch's batches for all ranks together, before padding and splitting."""
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches: list[list[tuple[int, int]]] = []
        for _, members in sorted(self._groups().items()):
            if self.shuffle:
                rng.shuffle(members)
            items = [(i, rng.randrange(self.num_variants[i])) for i in members]
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _padded(self) -> list[list[tuple[int, int]]]:
        batches = self.global_batches()
        if self.drop_last:
            return batches[: len(batches) - len(batches) % self.world_size]
        pad = -len(batches) % self.world_size
        return batches + [batches[i % len(batches)] for i in range(pad)] if batches else batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip, self.skip = self.skip, 0
        yield from self._padded()[self.rank :: self.world_size][skip:]

    def __len__(self) -> int:
        full, partial = 0, 0
        for members in self._groups().values():
            full += len(members) // self.batch_size
            partial += bool(len(members) % self.batch_size)
        total = full + (0 if self.drop_last else partial)
        total = total // self.world_size if self.drop_last else math.ceil(total / self.world_size)
        return total
