"""Toy scenes from the command line.

    python -m flux_lora.toy data OUT --count N --seed S [--size 64] [--shapes circle,square,triangle]
    python -m flux_lora.toy score FOLDER_OR_IMAGES...

``data`` writes ``scene_NNNNN.png`` with a ``.txt`` caption beside each (the trainer's image-folder layout).
``score`` prints the scorer's verdict per image and, for images with a caption file beside them, whether it
agrees, then the accuracy per attribute the captions name.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from flux_lora.data.scan import IMAGE_EXTENSIONS
from flux_lora.toy.scenes import ALL_SHAPES, SHAPES, Labels, parse_caption, write_dataset
from flux_lora.toy.scorer import ATTRIBUTES, Verdict, accuracy, score_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    path: Path
    verdict: Verdict
    expected: Labels | None  # from the caption file beside the image, if there is one


def image_files(sources: list[Path]) -> list[Path]:
    """The images named, and those found (recursively, hidden folders skipped) in the folders named."""
    found: list[Path] = []
    for source in sources:
        if source.is_dir():
            inside = [
                p
                for p in sorted(source.rglob("*"))
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(s.startswith(".") for s in p.relative_to(source).parts)
            ]
            if not inside:
                raise ValueError(f"{source}: no images in this folder")
            found += inside
        elif source.is_file():
            found.append(source)
        else:
            raise ValueError(f"{source}: no such file or folder")
    return found


def score_files(paths: list[Path]) -> list[Scored]:
    scored = []
    for path in paths:
        try:
            with Image.open(path) as image:
                verdict = score_image(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
        caption = path.with_suffix(".txt")
        expected = parse_caption(caption.read_text(encoding="utf-8")) if caption.is_file() else None
        scored.append(Scored(path, verdict, expected))
    return scored


def _line(item: Scored) -> str:
    seen = item.verdict.labels
    words = " ".join(str(getattr(seen, a)) for a in ATTRIBUTES) if seen.shape else "nothing drawn"
    if item.expected is None:
        return f"{item.path}: {words}"
    wrong = [
        f"{a} {getattr(item.expected, a)}"
        for a in ATTRIBUTES
        if getattr(item.expected, a) is not None and getattr(seen, a) != getattr(item.expected, a)
    ]
    return f"{item.path}: {words}" + (f"  (caption says {', '.join(wrong)})" if wrong else "  ok")


def _shapes(text: str) -> list[str]:
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    if not shapes or any(s not in ALL_SHAPES for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(ALL_SHAPES)}")
    return shapes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flux_lora.toy",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write a captioned dataset of procedural scenes")
    data.add_argument("out", type=Path)
    data.add_argument("--count", type=int, default=300)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--size", type=int, default=64, help="image side in px (a multiple of 16)")
    data.add_argument("--shapes", type=_shapes, default=list(SHAPES), help="comma-separated (star: the unseen one)")
    score = commands.add_parser("score", help="print the scorer's verdicts and the accuracy against captions")
    score.add_argument("sources", type=Path, nargs="+", metavar="FOLDER_OR_IMAGE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "data":
            write_dataset(args.out, args.count, args.seed, args.size, args.shapes)
            return 0
        scored = score_files(image_files(args.sources))
    except (ValueError, OSError) as e:
        log.error("error: %s", e)
        return 1
    for item in scored:
        log.info("%s", _line(item))
    pairs = [(s.verdict.labels, s.expected) for s in scored if s.expected is not None]
    summary = ", ".join(f"{a} {100 * v:.1f} %" for a, v in accuracy(pairs).items())
    log.info("%d images, %d with captions%s", len(scored), len(pairs), f"; accuracy: {summary}" if pairs else "")
    return 0
