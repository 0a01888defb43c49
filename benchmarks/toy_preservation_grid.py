"""Issue 21's table: preservation x adapter kind x blocks on the toy quick start, one row per call of
:func:`benchmarks.toy_preservation.run`, each saved as it finishes (a stopped grid keeps its rows; a rerun skips them).

    python benchmarks/toy_preservation_grid.py OUT_DIR          # trains and scores every missing row
    python benchmarks/toy_preservation_grid.py OUT_DIR --table  # the markdown table of the rows in OUT_DIR

Preservation: none (pink only); regularization images the base model draws (``configs/toy-reg.yaml``'s
``generate`` entry: 36 images of 18 captions of the known colours); output preservation (each caption with pink
replaced by the six known colours, weight 1); both (those images, and output preservation on their 18 captions,
weight 3). Kinds: LoRA, LoKr, DoRA (rank 16). Blocks: all, or the last double and the last single block.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.toy_preservation import ATTRIBUTES, Row, run  # noqa: E402

_REG = yaml.safe_load((ROOT / "configs" / "toy-reg.yaml").read_text())["data"]["datasets"]
_REG_PROMPTS = _REG[1]["generate"]["prompts"]
_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
PRESERVATION: dict[str, list[str]] = {
    "none": ["--data.datasets=" + json.dumps([{"source": "examples/pink"}])],
    "regularization images": ["--data.datasets=" + json.dumps(_REG)],
    "output preservation": [
        "--data.datasets=" + json.dumps([{"source": "examples/pink"}]),
        "--preservation.output_weight=1",
        "--preservation.replace_word=pink",
        "--preservation.replacements=" + json.dumps(_COLOURS),
    ],
    "both": [
        "--data.datasets=" + json.dumps(_REG),
        "--preservation.output_weight=3",
        "--preservation.prompts=" + json.dumps(_REG_PROMPTS),
    ],
}
KINDS: dict[str, list[str]] = {"LoRA": [], "LoKr": ["--lora.kind=lokr"], "DoRA": ["--lora.kind=dora"]}
BLOCKS: dict[str, list[str]] = {
    "all blocks": [],
    "double 1 + single 1": ["--lora.double_blocks=[1]", "--lora.single_blocks=[1]"],
}


def rows() -> list[Row]:
    """Every row, the most telling first: LoRA on all blocks, then the cheap rows of the other kinds and blocks."""
    p, (a, s) = list(PRESERVATION), list(BLOCKS)
    order = [(a, "LoRA", x) for x in p] + [(a, k, x) for k in ("LoKr", "DoRA") for x in p[:2]]
    order += [(s, "LoRA", x) for x in p[:2]] + [(a, k, x) for k in ("LoKr", "DoRA") for x in p[2:]]
    order += [(s, k, x) for k in ("LoKr", "DoRA") for x in p[:2]] + [(s, k, x) for k in KINDS for x in p[2:]]
    return [Row(f"{x} / {k} / {b}", [*PRESERVATION[x], *KINDS[k], *BLOCKS[b]]) for b, k, x in order]


def _file(out: Path, row: Row) -> Path:
    return out / (row.name.replace(" / ", "__").replace(" ", "_") + ".json")


def table(out: Path) -> str:
    done = [(r, json.loads(_file(out, r).read_text())) for r in rows() if _file(out, r).exists()]
    if not done:
        return "no rows measured yet"
    base = done[0][1]["base"]
    head = " | ".join(f"keep {a}" for a in ATTRIBUTES)
    lines = [
        f"| preservation | kind | blocks | concept (pink) | {head} | training | LoRA file |",
        "|---|---|---|---|" + "---|" * len(ATTRIBUTES) + "---|---|",
        f"| base model, no LoRA | - | - | {100 * base['concept']:.0f} % | "
        + " | ".join(f"{100 * base['keep'][a]:.0f} %" for a in ATTRIBUTES)
        + " | - | - |",
    ]
    for row, result in done:
        r = result["rows"][0]
        cells = " | ".join(row.name.split(" / "))
        keep = " | ".join(f"{100 * r['keep'][a]:.0f} %" for a in ATTRIBUTES)
        lines.append(
            f"| {cells} | {100 * r['concept']:.0f} % | {keep} | {r['train_seconds']:.0f} s | "
            f"{r['file_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    if "--table" in args:
        print(table(out))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for row in rows():
        if _file(out, row).exists():
            continue
        start = time.time()
        result = run([row])
        result["wall_s"] = time.time() - start
        _file(out, row).write_text(json.dumps(result, indent=1))
        print(row.name, result["rows"][0]["concept"], result["rows"][0]["keep"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
