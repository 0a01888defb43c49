"""Toy scenes from the command line.

    python -m flux_lora.toy data OUT --count N --seed S [--size 64] [--shapes circle,...] [--colours red,...]
    python -m flux_lora.toy pairs OUT --count N --seed S [--size 64]
    python -m flux_lora.toy score FOLDER_OR_IMAGES...
    python -m flux_lora.toy train OUT [--seed 0]

``data`` writes ``scene_NNNNN.png`` with a ``.txt`` caption beside each (the trainer's image-folder layout).
``pairs`` writes Kontext editing pairs (``OUT/targets``: pink shapes captioned "make it pink";
``OUT/references``: the same shapes in their own colours; train with ``--data.source OUT/targets
--data.references OUT/references``).
``score`` prints the scorer's verdict per image and whether it agrees with what the image was meant to show (the
caption file beside it, or the prompt a generated PNG records), then the accuracy per attribute the prompts name;
the trainer's preview images are summed up per training step, so a LoRA's samples read as before and after. Keep
previews (``sample.keep_prompts``: what the LoRA must not change) get lines of their own, each attribute beside
its figure at the first step scored (step 0: the base model's own), so bleeding shows as a drop.
``train`` trains the toy model from scratch (about 10 minutes on two CPU cores) and writes its model folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from flux_lora.data.scan import IMAGE_EXTENSIONS
from flux_lora.inference.outputs import SETTINGS_CHUNK
from flux_lora.toy.pairs import write_pairs
from flux_lora.toy.recipe import Recipe
from flux_lora.toy.scenes import ALL_COLOURS, ALL_SHAPES, COLOURS, SHAPES, Labels, parse_caption, write_dataset
from flux_lora.toy.scorer import ATTRIBUTES, Verdict, accuracy, score_image
from flux_lora.toy.train import train_toy
from flux_lora.training.console import quiet_third_party

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    path: Path
    verdict: Verdict
    expected: Labels | None  # from the caption file beside the image or the prompt the PNG records
    step: int | None = None  # the training step of a trainer's preview image
    keep: bool = False  # a keep preview (sample.keep_prompts): what the LoRA must leave as the base model draws it


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


def _recorded(image: Image.Image) -> dict[str, Any]:
    """The settings a generated PNG records (our ``flux_lora`` text chunk), or ``{}``."""
    try:
        settings = json.loads(image.info.get(SETTINGS_CHUNK, "{}"))
    except json.JSONDecodeError:
        return {}
    return settings if isinstance(settings, dict) else {}


def score_files(paths: list[Path]) -> list[Scored]:
    scored = []
    for path in paths:
        try:
            with Image.open(path) as image:
                verdict = score_image(image.convert("RGB"))
                settings = _recorded(image)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
        caption = path.with_suffix(".txt")
        prompt = caption.read_text(encoding="utf-8") if caption.is_file() else settings.get("prompt")
        expected = parse_caption(prompt) if isinstance(prompt, str) else None
        step = settings.get("step")
        keep = settings.get("keep") is True
        scored.append(Scored(path, verdict, expected, step if isinstance(step, int) else None, keep))
    return scored


def summary(scored: list[Scored]) -> list[str]:
    """One line per training step (previews) or one for all: images, and accuracy per attribute named. Keep
    previews get a line of their own per step, ``keep accuracy``, each figure followed by that of the first step
    scored when there are several (the base model's own at step 0)."""
    groups: dict[tuple[int | None, bool], list[Scored]] = defaultdict(list)
    for item in scored:
        groups[(item.step, item.keep)].append(item)
    lines, first_keep = [], None
    for step, keep in sorted(groups, key=lambda g: (-1 if g[0] is None else g[0], g[1])):
        items = groups[(step, keep)]
        pairs = [(s.verdict.labels, s.expected) for s in items if s.expected is not None]
        where = ("" if step is None else f"step {step}") + (" keep" if keep else "")
        result = accuracy(pairs)
        if keep and first_keep is None:
            first_keep = (step, result)
        parts = []
        for a, v in result.items():
            part = f"{a} {100 * v:.0f} %"
            if keep and first_keep is not None and first_keep[0] != step and a in first_keep[1]:
                part += f" (step {first_keep[0]}: {100 * first_keep[1][a]:.0f} %)"
            parts.append(part)
        name = "keep accuracy" if keep else "accuracy"
        lines.append(
            f"{where + ': ' if where else ''}{len(items)} images, {len(pairs)} with prompts"
            + (f"; {name}: {', '.join(parts)}" if pairs else "")
        )
    return lines


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


def _choices(text: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if not chosen or any(s not in allowed for s in chosen):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(allowed)}")
    return chosen


def _shapes(text: str) -> list[str]:
    return _choices(text, ALL_SHAPES)


def _colours(text: str) -> list[str]:
    return _choices(text, tuple(ALL_COLOURS))


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
    data.add_argument("--colours", type=_colours, default=list(COLOURS), help="comma-separated (pink: the unseen one)")
    pairs = commands.add_parser("pairs", help="write Kontext editing pairs: a shape -> the same shape in pink")
    pairs.add_argument("out", type=Path)
    pairs.add_argument("--count", type=int, default=48)
    pairs.add_argument("--seed", type=int, default=11)
    pairs.add_argument("--size", type=int, default=64, help="image side in px (a multiple of 16)")
    score = commands.add_parser("score", help="print the scorer's verdicts and the accuracy against captions")
    score.add_argument("sources", type=Path, nargs="+", metavar="FOLDER_OR_IMAGE")
    train = commands.add_parser("train", help="train the toy model from scratch and write its model folder")
    train.add_argument("out", type=Path)
    train.add_argument("--seed", type=int, default=Recipe.seed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_third_party()
    try:
        if args.command == "data":
            write_dataset(args.out, args.count, args.seed, args.size, args.shapes, args.colours)
            return 0
        if args.command == "pairs":
            write_pairs(args.out, args.count, args.seed, args.size)
            return 0
        if args.command == "train":
            train_toy(args.out, Recipe(seed=args.seed))
            return 0
        scored = score_files(image_files(args.sources))
    except (ValueError, OSError) as e:
        log.error("error: %s", e)
        return 1
    for item in scored:
        log.info("%s", _line(item))
    for line in summary(scored):
        log.info("%s", line)
    return 0
