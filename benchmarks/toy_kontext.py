"""Is an editing LoRA learned from image pairs? The toy model used as a FLUX.1 Kontext model, judged by the toy scorer.

    python benchmarks/toy_kontext.py --out toy_kontext.json [--pairs 48] [--held-out 36] [--steps 300]

Pairs (:mod:`flux_lora.toy.pairs`): reference = a shape in one of the toy's six colours; target = the same shape,
position, size, jitter and background in pink; instruction "make it pink". A rank-16 LoRA trains with
``configs/toy.yaml``'s recipe (fp8 base) on ``--pairs`` pairs (seed 11) with ``data.references``; then, for
``--held-out`` references of another seed (12), the model edits each (prompt "make it pink", the reference's
tokens appended, the noise of seed i for reference i) before and after. Scored per image: the colour is pink;
shape, position and size equal the reference's. Controls draw the same prompt and seeds without the reference, with
and without the LoRA.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.toy_preservation import Row, train  # noqa: E402
from benchmarks.toy_quality import BASES, load_pipeline  # noqa: E402
from flux_lora.atomic import write_text_atomic  # noqa: E402
from flux_lora.inference.pipeline import FluxPipeline  # noqa: E402
from flux_lora.lora.files import read_lora  # noqa: E402
from flux_lora.lora.runtime import apply_loras  # noqa: E402
from flux_lora.toy.pairs import INSTRUCTION, edit_pair, write_pairs  # noqa: E402
from flux_lora.toy.scenes import UNSEEN_COLOUR, Scene, render  # noqa: E402
from flux_lora.toy.scorer import score_image  # noqa: E402

log = logging.getLogger("toy_kontext")
KEPT = ("shape", "position", "size")


def edit(pipe: FluxPipeline, references: list[Scene], with_reference: bool = True) -> list[np.ndarray]:
    """One edit per reference, all in one batch, reference i from the noise of seed i (as a lone call with
    ``seed=i`` draws): ``[H, W, 3]`` uint8 images."""
    noise = torch.cat([pipe.noise(1, 8, 8, torch.Generator().manual_seed(i)) for i in range(len(references))])
    pixels = torch.stack([torch.from_numpy(np.asarray(render(s), dtype=np.float32) / 255) for s in references])
    image = pipe(
        [INSTRUCTION] * len(references),
        height=64,
        width=64,
        latents=noise,
        reference_image=pixels.permute(0, 3, 1, 2) if with_reference else None,
        reference_size="keep",
        output_type="pt",
        progress=False,
    )
    return list((image.float().permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy())


def judge(images: list[np.ndarray], references: list[Scene]) -> dict[str, float]:
    """Share of images drawn pink, and of images whose shape / position / size equal the reference's."""
    verdicts = [score_image(img).labels for img in images]
    n = len(images)
    result = {"pink": sum(v.colour == UNSEEN_COLOUR for v in verdicts) / n}
    for attr in KEPT:
        result[attr] = sum(getattr(v, attr) == getattr(r, attr) for v, r in zip(verdicts, references, strict=True)) / n
    result["all four"] = (
        sum(
            v.colour == UNSEEN_COLOUR and all(getattr(v, a) == getattr(r, a) for a in KEPT)
            for v, r in zip(verdicts, references, strict=True)
        )
        / n
    )
    return result


def run(pairs: int, held_out: int, steps: int) -> dict:
    base = {b.name: b for b in BASES}["fp8 scaled (default)"]
    pipe = load_pipeline(ROOT / "models" / "flux-toy", base)
    references = [edit_pair(12, i)[0] for i in range(held_out)]
    result: dict = {"pairs": pairs, "held_out": held_out, "steps": steps}
    result["scorer on the references themselves"] = judge([np.asarray(render(s)) for s in references], references)
    result["base, with reference"] = judge(edit(pipe, references), references)
    result["base, without reference (control)"] = judge(edit(pipe, references, with_reference=False), references)
    log.info("base: %s", result["base, with reference"])
    with tempfile.TemporaryDirectory() as tmp:
        targets, refs = write_pairs(Path(tmp) / "pairs", pairs, seed=11)
        overrides = [
            "--data.datasets=[]",
            f"--data.source={targets}",
            f"--data.references={refs}",
            f"--train.max_steps={steps}",
        ]
        lora, seconds = train(Row("kontext", overrides), Path(tmp) / "run", Path(tmp) / "cache")
        result["train_seconds"] = seconds
        apply_loras(pipe.dit, [(read_lora(lora, pipe.dit.params), 1.0, "edit")])
    result["LoRA, with reference"] = judge(edit(pipe, references), references)
    result["LoRA, without reference (control)"] = judge(edit(pipe, references, with_reference=False), references)
    log.info("%s", result)
    return result


def table(result: dict) -> str:
    cols = ("pink", *KEPT, "all four")
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in (
        "scorer on the references themselves",
        "base, with reference",
        "base, without reference (control)",
        "LoRA, with reference",
        "LoRA, without reference (control)",
    ):
        lines.append(f"| {name} | " + " | ".join(f"{100 * result[name][c]:.0f} %" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--held-out", type=int, default=36)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    result = run(args.pairs, args.held_out, args.steps)
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
