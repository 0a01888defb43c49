"""Editing pairs for a toy Kontext proof: a reference (a shape in one of the toy's colours) and its target (the same
shape, position, size, jitter and background, in pink), captioned with the instruction :data:`INSTRUCTION`.

:func:`write_pairs` writes the layout the trainer reads with ``data.references``: ``targets/`` (images and
``.txt`` captions) and a sibling ``references/`` with the same file names.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flux_lora.atomic import write_bytes_atomic, write_text_atomic
from flux_lora.toy.scenes import COLOURS, SHAPES, UNSEEN_COLOUR, Scene, _png, make_scene, render

INSTRUCTION = "make it pink"


def edit_pair(seed: int, index: int) -> tuple[Scene, Scene]:
    """``(reference scene, target scene)``: the target is the reference recoloured pink."""
    reference = make_scene(seed, index, SHAPES, tuple(COLOURS))
    return reference, replace(reference, colour=UNSEEN_COLOUR)


def write_pairs(out: str | Path, count: int, seed: int, size: int = 64) -> tuple[Path, Path]:
    """Write ``count`` pairs under ``out``; returns ``(targets folder, references folder)``."""
    out = Path(out)
    targets, references = out / "targets", out / "references"
    targets.mkdir(parents=True, exist_ok=True)
    references.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        reference, target = edit_pair(seed, i)
        name = f"{i:05d}"
        write_bytes_atomic(references / f"{name}.png", _png(render(reference, size)))
        write_bytes_atomic(targets / f"{name}.png", _png(render(target, size)))
        write_text_atomic(targets / f"{name}.txt", INSTRUCTION + "\n")
    return targets, references
