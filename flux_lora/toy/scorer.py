"""A scorer for toy scenes that needs no network and no weights: plain image statistics decide what an image shows.

1. The background colour is the median of the border ring; a pixel's *contrast* is its RGB distance to it.
2. The foreground is the largest 4-connected region of pixels above half the image's peak contrast (its 99th
   percentile), so a soft (blurred) edge is cut where it is half covered and stray noisy pixels are dropped.
3. Colour: the palette colour nearest to the mean of the foreground's core (contrast >= 3/4 of the peak).
4. Position: the foreground's centroid x (thirds of the width); size: the longer side of its bounding box.
5. Shape, measured on a grid :data:`UPSAMPLE` times finer (bilinear) so small shapes keep sub-pixel edges: a
   star when the solidity (area / convex hull area) is under :data:`STAR_SOLIDITY`, else the convex shape whose
   fill of the bounding box is nearest: circle pi/4, square 1, triangle 1/2.

An image without a clear foreground (peak contrast under :data:`MIN_CONTRAST`) gets a verdict of ``None``s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from flux_lora.toy.scenes import ALL_COLOURS, POSITION_X, POSITIONS, SIZE_SPAN, Labels

UPSAMPLE = 4  # shape measured on a grid this much finer than the image
MIN_CONTRAST = 40.0  # RGB distance (0-255 scale) below which nothing is drawn
CONVEX_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding box of the convex shapes
STAR_SOLIDITY = 0.85  # below: a star (convex shapes measure >= 0.93 here, small blurred stars <= 0.75)
_PALETTE = np.array(list(ALL_COLOURS.values()), dtype=np.float32)
_X_CUTS = [(POSITION_X[a] + POSITION_X[b]) / 2 for a, b in zip(POSITIONS, POSITIONS[1:], strict=False)]
_SIZE_CUT = sum(SIZE_SPAN.values()) / len(SIZE_SPAN)


@dataclass(frozen=True)
class Verdict:
    """What the scorer sees, with the measurements it decided from."""

    labels: Labels
    fill: float = 0.0
    solidity: float = 0.0
    centroid_x: float = 0.0  # fraction of the width
    extent: float = 0.0  # longer side of the bounding box, fraction of the image side


def score_image(image: Image.Image | np.ndarray) -> Verdict:
    """The verdict on one RGB image (a PIL image or an ``H x W x 3`` array on the 0-255 scale)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    contrast = np.linalg.norm(pixels - _background(pixels), axis=-1)
    peak = float(np.percentile(contrast, 99))
    if peak < MIN_CONTRAST:
        return Verdict(Labels(None, None, None, None))
    mask = _largest_region(contrast > peak / 2)
    core = mask & (contrast >= 0.75 * peak)
    mean = pixels[core if core.any() else mask].mean(axis=0)
    colour = list(ALL_COLOURS)[int(np.argmin(np.linalg.norm(_PALETTE - mean, axis=-1)))]
    ys, xs = np.nonzero(mask)
    centroid_x = (float(xs.mean()) + 0.5) / mask.shape[1]
    fine = _fine_mask(np.where(_dilate(mask), contrast, 0.0), peak / 2)
    height, width = _span(np.any(fine, axis=1)), _span(np.any(fine, axis=0))
    area = float(fine.sum())
    fill, solidity = area / float(height * width), area / _hull_area(fine)
    extent = max(width / mask.shape[1], height / mask.shape[0]) / UPSAMPLE
    labels = Labels(
        shape=_shape(fill, solidity),
        colour=colour,
        position=POSITIONS[int(np.searchsorted(_X_CUTS, centroid_x))],
        size="large" if extent > _SIZE_CUT else "small",
    )
    return Verdict(labels, fill, solidity, centroid_x, extent)


def _shape(fill: float, solidity: float) -> str:
    if solidity < STAR_SOLIDITY:
        return "star"
    return min(CONVEX_FILL, key=lambda s: abs(fill - CONVEX_FILL[s]))


def _background(pixels: np.ndarray, ring: int = 2) -> np.ndarray:
    border = np.concatenate(
        [
            pixels[:ring].reshape(-1, 3),
            pixels[-ring:].reshape(-1, 3),
            pixels[:, :ring].reshape(-1, 3),
            pixels[:, -ring:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _fine_mask(contrast: np.ndarray, threshold: float) -> np.ndarray:
    """The region where ``contrast`` (zero outside the foreground) exceeds ``threshold``, on a grid
    :data:`UPSAMPLE` times finer (bilinear): edges and corners at sub-pixel precision, for small shapes."""
    h, w = contrast.shape
    image = Image.fromarray(contrast.astype(np.float32), "F")
    return np.asarray(image.resize((w * UPSAMPLE, h * UPSAMPLE), Image.Resampling.BILINEAR)) > threshold


def _span(occupied: np.ndarray) -> int:
    where = np.nonzero(occupied)[0]
    return int(where[-1] - where[0] + 1)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (labels spread as the minimum index until stable)."""
    big = mask.size + 1
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        spread = np.where(mask, neighbours, big)
        if np.array_equal(spread, labels):
            break
        labels = spread
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixels (as unit squares), from each row's outer pixel corners."""
    points: list[tuple[float, float]] = []
    for row in np.nonzero(mask.any(axis=1))[0].tolist():
        xs = np.nonzero(mask[row])[0]
        x0, x1, y = float(xs[0]), float(xs[-1]) + 1, float(row)
        points += [(x0, y), (x0, y + 1), (x1, y), (x1, y + 1)]
    hull = _convex_hull(sorted(set(points)))
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1], strict=True)))


def _convex_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Andrew's monotone chain on sorted points; the hull counter-clockwise."""

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(points), half(points[::-1])
    return lower[:-1] + upper[:-1]


ATTRIBUTES = tuple(f.name for f in fields(Labels))


def accuracy(pairs: Iterable[tuple[Labels, Labels]]) -> dict[str, float]:
    """Per attribute, the fraction of ``(seen, expected)`` pairs that agree, over the pairs whose expected
    labels name that attribute (attributes no caption names are left out)."""
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for seen, expected in pairs:
        for a in ATTRIBUTES:
            if getattr(expected, a) is not None:
                hits[a].append(getattr(seen, a) == getattr(expected, a))
    return {a: sum(h) / len(h) for a, h in hits.items() if h}
