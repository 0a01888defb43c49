"""Procedural scenes for the toy model: one flat shape on a plain background, with its caption and labels.

A scene is a shape (circle, square, triangle; ``star`` is kept out of the default set as the concept a LoRA
will later teach), one of six colours, a position (left, centre, right), a size (small, large) and a light
background colour. Scenes are deterministic by ``(seed, index)``: the same call draws the same pixels on every
machine. :func:`write_dataset` writes them as an image folder with a ``.txt`` caption beside each image, the
layout the trainer's data scan reads.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from flux_lora.atomic import write_bytes_atomic, write_text_atomic
from flux_lora.sampling import SIDE_MULTIPLE

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")  # the shapes of the toy model's own data
UNSEEN_SHAPE = "star"  # reserved: the concept a LoRA teaches later
ALL_SHAPES = (*SHAPES, UNSEEN_SHAPE)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (40, 70, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 45, 175),
    "orange": (240, 125, 25),
}
UNSEEN_COLOUR = "pink"  # reserved like the star: the colour a LoRA teaches (the autoencoder sees it, the DiT never)
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, UNSEEN_COLOUR: (240, 105, 180)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "grey": (218, 218, 218),
    "cream": (246, 236, 210),
    "light blue": (210, 228, 245),
}
POSITIONS = ("left", "centre", "right")
SIZES = ("small", "large")
POSITION_X = {"left": 0.25, "centre": 0.5, "right": 0.75}  # centre of the shape, as a fraction of the width
SIZE_SPAN = {"small": 0.22, "large": 0.36}  # width of the shape's box, as a fraction of the image side
POSITION_WORDS = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
SUPERSAMPLE = 4  # drawn this much larger, then reduced: smooth edges


@dataclass(frozen=True)
class Labels:
    """What a caption says (``None`` where it does not say)."""

    shape: str | None
    colour: str | None
    position: str | None
    size: str | None


@dataclass(frozen=True)
class Scene:
    """One scene: the labels plus the small jitter that makes images of equal labels differ."""

    shape: str
    colour: str
    position: str
    size: str
    background: str
    dx: float = 0.0  # offsets of the centre, fractions of the side
    dy: float = 0.0
    scale: float = 1.0  # of the size's span

    @property
    def labels(self) -> Labels:
        return Labels(self.shape, self.colour, self.position, self.size)

    @property
    def caption(self) -> str:
        where = POSITION_WORDS[self.position]
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {where}, {self.size}, on a {self.background} background"


def parse_caption(caption: str) -> Labels:
    """The labels a caption (ours, or a prompt with a trigger word around it) names; ``None`` for those it
    does not. ``center`` counts as ``centre``."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()

    def first(options: Sequence[str]) -> str | None:
        return next((w for w in words if w in options), None)

    position = first(("left", "centre", "center", "right"))
    return Labels(
        shape=first(ALL_SHAPES),
        colour=first(tuple(ALL_COLOURS)),
        position="centre" if position == "center" else position,
        size=first(SIZES),
    )


def make_scene(seed: int, index: int, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = tuple(COLOURS)) -> Scene:
    """The ``index``-th scene of the set drawn with ``seed`` (independent of how many are drawn)."""
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown or not shapes:
        raise ValueError(f"shapes {list(shapes)}: each must be one of {', '.join(ALL_SHAPES)}")
    if not colours or any(c not in ALL_COLOURS for c in colours):
        raise ValueError(f"colours {list(colours)}: each must be one of {', '.join(ALL_COLOURS)}")
    rng = random.Random(f"flux-lora-toy:{seed}:{index}")
    return Scene(
        shape=rng.choice(list(shapes)),
        colour=rng.choice(list(colours)),
        position=rng.choice(POSITIONS),
        size=rng.choice(SIZES),
        background=rng.choice(list(BACKGROUNDS)),
        dx=rng.uniform(-0.03, 0.03),
        dy=rng.uniform(-0.08, 0.08),
        scale=rng.uniform(0.9, 1.1),
    )


def keep_scenes() -> list[Scene]:
    """The keep set: every shape x colour x position of the toy model's own vocabulary (54 scenes, no pink, no
    star), sizes and backgrounds taken in turn. A LoRA that teaches a new concept should leave these as the base
    model draws them; the toy scorer reports them apart (``sample.keep_prompts``) as the *keep* accuracy."""
    combos = [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]
    backgrounds = list(BACKGROUNDS)
    return [
        Scene(shape, colour, position, SIZES[i % len(SIZES)], backgrounds[i % len(backgrounds)])
        for i, (shape, colour, position) in enumerate(combos)
    ]


def make_scenes(
    count: int, seed: int, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = tuple(COLOURS)
) -> list[Scene]:
    return [make_scene(seed, i, shapes, colours) for i in range(count)]


def shape_points(shape: str, cx: float, cy: float, span: float) -> list[tuple[float, float]]:
    """Polygon of ``shape`` centred at ``(cx, cy)`` filling a ``span`` x ``span`` box (circle: its box)."""
    h = span / 2
    if shape in ("circle", "square"):
        return [(cx - h, cy - h), (cx + h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":  # five points, upright; the outer radius chosen so the star's height equals span
        outer = span / (1 + math.cos(math.pi / 5))
        top = cy - h + outer
        radii = [outer if k % 2 == 0 else 0.382 * outer for k in range(10)]
        return [(cx + r * math.sin(k * math.pi / 5), top - r * math.cos(k * math.pi / 5)) for k, r in enumerate(radii)]
    raise ValueError(f"shape {shape!r}: must be one of {', '.join(ALL_SHAPES)}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    span = SIZE_SPAN[scene.size] * scene.scale * big
    cx = (POSITION_X[scene.position] + scene.dx) * big
    cy = (0.5 + scene.dy) * big
    points = shape_points(scene.shape, cx, cy, span)
    fill = ALL_COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(points, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(points, fill=fill)
    else:
        draw.polygon(points, fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def degrade(image: Image.Image, seed: int, noise: float = 8.0, blur: float = 0.8) -> Image.Image:
    """``image`` blurred (Gaussian, radius ``blur`` px) with Gaussian noise of std ``noise`` (0-255 scale)
    added: a stand-in for the imperfect images a generator draws."""
    blurred = image.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else image
    pixels = np.asarray(blurred, dtype=np.float64)
    noisy = pixels + np.random.default_rng(seed).normal(0.0, noise, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(
    out: str | Path,
    count: int,
    seed: int,
    size: int = 64,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
) -> list[Path]:
    """``count`` scenes as ``scene_NNNNN.png`` with ``scene_NNNNN.txt`` captions in ``out``; the image paths."""
    if count < 1:
        raise ValueError(f"count {count}: must be at least 1")
    if size < SIDE_MULTIPLE or size % SIDE_MULTIPLE:
        raise ValueError(f"size {size}: must be a multiple of {SIDE_MULTIPLE} px")
    out = Path(out)
    paths = []
    for index, scene in enumerate(make_scenes(count, seed, shapes, colours)):
        stem = out / f"scene_{index:05d}"
        paths.append(write_bytes_atomic(stem.with_suffix(".png"), _png(render(scene, size))))
        write_text_atomic(stem.with_suffix(".txt"), scene.caption + "\n")
    log.info("wrote %d scenes (seed %d, %d px) to %s", count, seed, size, out)
    return paths
