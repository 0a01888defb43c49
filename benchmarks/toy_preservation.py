"""Does the quick start's LoRA learn its concept and keep the rest? One row per recipe, judged by the toy scorer.

    python benchmarks/toy_preservation.py --out toy_preservation.json [--md table.md] [--threads 2]
        [--row "name=--override=value --override=value" ...] [--only NAME ...]

Each row trains ``configs/toy.yaml`` (fp8 base, from the repository root) with its overrides (the same syntax as
``train.py``'s command line, so rows for ``lora.kind``, block subsets or preservation settings are one line each),
then draws with the LoRA at strength 1.0, one seed per prompt (seed i for prompt i):
- concept: the 18 pink scenes (every shape, position, size): the share drawn pink;
- keep: the 54 keep scenes (``flux_lora.toy.scenes.keep_scenes``: every shape, colour and position, no pink),
  accuracy per attribute, beside the base model's own on the same prompts and seeds.
Columns also give the training time (the run's own "trained N steps in S s": the fit, not loading) and the LoRA
file size. Writes JSON and a markdown table (printed, and to ``--md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flux_lora.atomic import write_text_atomic
from flux_lora.cli.train import main as train_main
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.lora.files import read_lora
from flux_lora.lora.runtime import apply_loras, remove_loras
from flux_lora.toy.scenes import SIZES, Scene, keep_scenes, parse_caption
from flux_lora.toy.scorer import accuracy, score_image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.toy_quality import BASES, TOY_CONFIG, load_pipeline  # noqa: E402

log = logging.getLogger("toy_preservation")
ATTRIBUTES = ("shape", "colour", "position", "size")
# rows as train.py overrides on configs/toy.yaml (paths relative to the repository root)
PINK_ONLY = "--data.datasets=[{source: examples/pink}]"
PRESERVE = [
    "--preservation.output_weight=1",
    "--preservation.replace_word=pink",
    "--preservation.replacements=[red, green, blue, yellow, purple, orange]",
]
ROWS: dict[str, list[str]] = {
    "pink only (the quick start before)": [PINK_ONLY],
    "pink + regularization scenes (toy.yaml)": [],
    "pink only + output preservation": [PINK_ONLY, *PRESERVE],
}  # (replace_word needs the word in every caption: with the regularization scenes, use preservation.prompts)


@dataclass(frozen=True)
class Row:
    name: str
    overrides: list[str]


def concept_scenes(colour: str = "pink") -> list[Scene]:
    """The concept set: every shape x position x size in ``colour`` (18 scenes), backgrounds in turn."""
    backgrounds = ("white", "grey", "cream", "light blue")
    combos = [(s, p, z) for s in ("circle", "square", "triangle") for p in ("left", "centre", "right") for z in SIZES]
    return [Scene(s, colour, p, z, backgrounds[i % 4]) for i, (s, p, z) in enumerate(combos)]


def generate(pipe: FluxPipeline, prompts: list[str], size: int = 64, batch: int = 32) -> np.ndarray:
    """One image per prompt, prompt ``i`` from the noise of seed ``i`` (as a lone call with ``seed=i`` draws),
    in batches: ``[N, H, W, 3]`` uint8."""
    side = size // 8
    noise = torch.cat([pipe.noise(1, side, side, torch.Generator().manual_seed(i)) for i in range(len(prompts))])
    images = []
    for start in range(0, len(prompts), batch):
        out = pipe(
            prompts[start : start + batch],
            height=size,
            width=size,
            latents=noise[start : start + batch],
            output_type="pt",
            progress=False,
        )
        images.append((out.float().permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy())
    return np.concatenate(images)


def judge(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    return accuracy([(score_image(img).labels, parse_caption(p)) for img, p in zip(images, prompts, strict=True)])


class _Seconds(logging.Handler):
    """Catches the run's end summary ("trained N steps in this run (...) in S s")."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"trained \d+ steps in this run \(to step \d+\) in (\d+) s", record.getMessage())
        if found:
            self.seconds = float(found.group(1))


def train(row: Row, out: Path, cache: Path) -> tuple[Path, float]:
    argv = [
        "--config",
        str(TOY_CONFIG),
        f"--output_dir={out}",
        f"--data.cache_dir={cache}",
        "--quantize=float8_e4m3fn",
        "--train.checkpoint_every_n_steps=0",
        "--sample.prompts=[]",
        "--sample.keep_prompts=[]",
        *row.overrides,
    ]
    catcher = _Seconds()
    logging.getLogger("flux_lora.training.run").addHandler(catcher)
    try:
        if train_main(argv) != 0:
            raise RuntimeError(f"row {row.name!r}: training failed ({shlex.join(row.overrides)})")
    finally:
        logging.getLogger("flux_lora.training.run").removeHandler(catcher)
    if catcher.seconds is None:
        raise RuntimeError(f"row {row.name!r}: no training time in the run's log")
    return next(out.glob("*.safetensors")), catcher.seconds


def run(rows: list[Row], strength: float = 1.0) -> dict:
    base = {b.name: b for b in BASES}["fp8 scaled (default)"]
    pipe = load_pipeline(ROOT / "models" / "flux-toy", base)
    concept = [s.caption for s in concept_scenes()]
    keep = [s.caption for s in keep_scenes()]
    result: dict = {
        "concept_prompts": len(concept),
        "keep_prompts": len(keep),
        "strength": strength,
        "base": {
            "concept": judge(generate(pipe, concept), concept)["colour"],
            "keep": judge(generate(pipe, keep), keep),
        },
        "rows": [],
    }
    log.info("base model: %s", result["base"])
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(rows):
            lora, seconds = train(row, Path(tmp) / f"run{i}", Path(tmp) / "cache")
            apply_loras(pipe.dit, [(read_lora(lora, pipe.dit.params), strength, "row")])
            try:
                measured = {
                    "name": row.name,
                    "overrides": row.overrides,
                    "concept": judge(generate(pipe, concept), concept)["colour"],
                    "keep": judge(generate(pipe, keep), keep),
                    "train_seconds": seconds,
                    "file_bytes": lora.stat().st_size,
                }
            finally:
                remove_loras(pipe.dit)
            log.info("%s", measured)
            result["rows"].append(measured)
    return result


def table(result: dict) -> str:
    base = result["base"]
    head = " | ".join(f"keep {a}" for a in ATTRIBUTES)
    lines = [
        f"| recipe | concept (pink) | {head} | training | LoRA file |",
        "|---|---|" + "---|" * len(ATTRIBUTES) + "---|---|",
        "| base model (no LoRA) | "
        + f"{100 * base['concept']:.0f} % | "
        + " | ".join(f"{100 * base['keep'][a]:.0f} %" for a in ATTRIBUTES)
        + " | - | - |",
    ]
    for r in result["rows"]:
        keep = " | ".join(f"{100 * r['keep'][a]:.0f} %" for a in ATTRIBUTES)
        lines.append(
            f"| {r['name']} | {100 * r['concept']:.0f} % | {keep} | {r['train_seconds']:.0f} s "
            f"| {r['file_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines)


def parse_row(text: str) -> Row:
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: a row is 'name=--override=value ...'")
    return Row(name.strip(), shlex.split(overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON result")
    parser.add_argument("--md", type=Path, help="also write the markdown table here")
    parser.add_argument("--row", type=parse_row, action="append", default=[], help="'name=--override=value ...'")
    parser.add_argument("--only", action="append", default=[], help="run only the built-in rows of these names")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the config's and the rows' relative paths (models/, examples/)
    rows = [Row(n, o) for n, o in ROWS.items() if not args.only or n in args.only] + args.row
    result = run(rows, args.strength)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    text = table(result)
    if args.md:
        write_text_atomic(args.md, text + "\n")
    print(text)  # noqa: T201 - the report is the output
    return 0


if __name__ == "__main__":
    sys.exit(main())
