"""The LoRA test bench: a grid of prompts x strengths x LoRA files with one fixed seed, drawn by the project's own
``generate.py`` (its fp8 and offload options, its PNG metadata) in one child process per grid
(:mod:`flux_lora.ui.bench_worker`): torch is imported there, not in the UI, and the GPU memory is released when the
grid is done."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from flux_lora.atomic import write_atomic, write_text_atomic
from flux_lora.ui.paths import Roots, check_inside

BENCH_DIR = "bench"


@dataclass(frozen=True)
class Cell:
    prompt: int
    lora: Path
    strength: float
    output: Path


def lora_files(roots: Roots) -> list[str]:
    """LoRA files under the output root (caches left out), relative to it, newest first."""
    found = [
        p
        for p in roots.output.rglob("*.safetensors")
        if not ({"cache", ".ui-cache"} & set(p.relative_to(roots.output).parts)) and p.is_file()
    ]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p.relative_to(roots.output)) for p in found]


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"strengths {text!r}: give numbers, e.g. 0, 0.5, 1") from None
    if not values:
        raise ValueError("give at least one strength")
    return values


def plan(roots: Roots, loras: list[str], prompts: list[str], strengths: list[float]) -> tuple[Path, list[Cell]]:
    """A new folder ``<output root>/bench/<time>/`` and the grid's cells (one PNG each)."""
    if not loras or not prompts:
        raise ValueError("choose at least one LoRA file and one prompt")
    files = [roots.output_path(f) for f in loras]
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: no such LoRA file")
    folder = roots.output / BENCH_DIR / time.strftime("%Y%m%d-%H%M%S")
    n = 2
    while folder.exists():
        folder = folder.with_name(f"{folder.name.split('_')[0]}_{n}")
        n += 1
    cells = [
        Cell(p, f, s, folder / f"p{p}-{f.stem}-s{s:g}.png")
        for p in range(len(prompts))
        for f in files
        for s in strengths
    ]
    return folder, cells


def generate_args(
    cell: Cell, prompt: str, *, model: str, seed: int, steps: int, size: int, quantize: str, offload: str
) -> list[str]:
    """The ``generate.py`` command line of one cell (what the PNG's metadata then records)."""
    args = ["--model", model, "--prompt", prompt, "--seed", str(seed), "--steps", str(steps)]
    args += ["--height", str(size), "--width", str(size), "--lora", f"{cell.lora}:{cell.strength:g}"]
    args += ["--offload", offload, "--output", str(cell.output), "--quiet"]
    return args + (["--quantize", quantize] if quantize and quantize != "none" else [])


def run_grid(
    roots: Roots,
    loras: list[str],
    prompts: list[str],
    strengths: list[float],
    *,
    model: str,
    seed: int,
    steps: int,
    size: int,
    quantize: str = "none",
    offload: str = "none",
    timeout: float = 3600,
) -> tuple[Path, list[Cell]]:
    """Draw the grid in a child process; returns the grid PNG (labelled) and the cells. Raises ``RuntimeError``
    with the generator's own error line."""
    folder, cells = plan(roots, loras, prompts, strengths)
    folder.mkdir(parents=True)
    jobs = [
        generate_args(
            c, prompts[c.prompt], model=model, seed=seed, steps=steps, size=size, quantize=quantize, offload=offload
        )
        for c in cells
    ]
    spec = write_text_atomic(folder / "grid.json", json.dumps({"jobs": jobs}, indent=1))
    done = subprocess.run(
        [sys.executable, "-m", "flux_lora.ui.bench_worker", str(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"the generator exited with status {done.returncode}")
    return compose(folder / "grid.png", cells, prompts, roots), cells


def compose(path: Path, cells: list[Cell], prompts: list[str], roots: Roots) -> Path:
    """One image: a row per prompt, a column per (LoRA, strength), labelled."""
    columns = list(dict.fromkeys((c.lora, c.strength) for c in cells))
    images = {(c.prompt, c.lora, c.strength): Image.open(check_inside(roots.output, c.output)) for c in cells}
    w, h = next(iter(images.values())).size
    side, label_h = max(w, 128), 28
    grid = Image.new("RGB", (len(columns) * side, label_h + len(prompts) * (side + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for j, (lora, strength) in enumerate(columns):
        draw.text((j * side + 4, 8), f"{lora.stem[:14]} @ {strength:g}", fill="black")
    for i, prompt in enumerate(prompts):
        top = label_h + i * (side + label_h)
        draw.text((4, top + 6), f"{i}: {prompt[:60]}", fill="black")
        for j, (lora, strength) in enumerate(columns):
            tile = images[(i, lora, strength)].convert("RGB").resize((side, side * h // w), Image.Resampling.NEAREST)
            grid.paste(tile, (j * side, top + label_h))
    return write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
