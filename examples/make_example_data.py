"""Write the small captioned image set in ``examples/data/`` (used by ``configs/tiny.yaml``),
deterministically.

    python examples/make_example_data.py [OUTDIR]

Eight PNGs of coloured shapes on plain or striped backgrounds, 64 to 128 px in four aspect ratios (1:1, 4:3,
3:4, 2:1), each with a ``.txt`` caption beside it. Drawn with PIL from fixed parameters, so re-running gives
the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

# (file stem, size, background, stripe colour or None, shape, shape colour, caption)
IMAGES = [
    ("red_circle", (96, 96), (240, 240, 230), None, "circle", (210, 40, 40), "a red circle on a white background"),
    ("blue_square", (96, 96), (250, 230, 120), None, "square", (40, 70, 200), "a blue square on a yellow background"),
    (
        "green_triangle",
        (128, 96),
        (200, 225, 250),
        None,
        "triangle",
        (40, 150, 60),
        "a green triangle on a blue sky background",
    ),
    (
        "orange_dot_stripes",
        (128, 96),
        (245, 245, 245),
        (180, 180, 200),
        "circle",
        (240, 140, 30),
        "an orange circle on a striped pattern background",
    ),
    (
        "purple_circle_tall",
        (96, 128),
        (30, 30, 40),
        None,
        "circle",
        (160, 80, 200),
        "a purple circle on a dark background",
    ),
    (
        "yellow_triangle_tall",
        (96, 128),
        (60, 110, 60),
        None,
        "triangle",
        (250, 220, 40),
        "a yellow triangle on a green background",
    ),
    (
        "pink_square_wide",
        (128, 64),
        (230, 230, 250),
        (200, 200, 240),
        "square",
        (240, 110, 170),
        "a pink square on a striped background, wide shot",
    ),
    (
        "brown_circle_wide",
        (128, 64),
        (170, 210, 240),
        None,
        "circle",
        (120, 80, 40),
        "a brown circle in the center of a blue sky",
    ),
]


def draw(size: tuple[int, int], background, stripes, shape: str, colour) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    pen = ImageDraw.Draw(image)
    if stripes is not None:
        for x in range(0, width, 16):
            pen.rectangle((x, 0, x + 7, height), fill=stripes)
    r = min(width, height) * 3 // 8
    cx, cy = width // 2, height // 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    return image


def write_example_data(out: Path) -> list[Path]:
    """Write every image and caption into ``out``; returns the image paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, size, background, stripes, shape, colour, caption in IMAGES:
        path = out / f"{stem}.png"
        draw(size, background, stripes, shape, colour).save(path, optimize=True)
        (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, nargs="?", default=Path(__file__).parent / "data")
    write_example_data(parser.parse_args().outdir)


if __name__ == "__main__":
    main()
