"""The seed's quality claim at toy scale: fp8 storage against bf16 and float32, judged by the toy scorer.

    python benchmarks/toy_quality.py --out toy_quality.json [--model models/flux-toy] [--prompts 48]
        [--lora-steps 300] [--skip-lora]

For each base (float32, bf16, fp8 with the per-row power-of-two scale (the default), fp8 as a plain cast):
1. prompt accuracy: the base model draws ``--prompts`` held-out scene captions (one seed each) and the scorer
   decides shape, colour, position and size; "all" counts an image right when every attribute is;
2. per-image output error against bf16 and float32 (mean absolute pixel difference, 0-255 scale, same seeds);
3. a LoRA trained on that base with the quick start's recipe (``configs/toy.yaml``: 24 pink shapes, ``--lora-steps``
   steps) and its concept accuracy: the share of pink prompts drawn pink, before and after; beside it the keep
   accuracy: the 54 keep scenes (``keep_scenes``: every shape, colour, position; no pink), per attribute, without
   and with the LoRA (strength 1.0), seed i for scene i. Bleeding shows as a drop.
fp8 bases compute in bf16, as on a GPU. Writes JSON (and prints a markdown table) for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from flux_lora.atomic import write_bytes_atomic, write_text_atomic
from flux_lora.cli.train import main as train_main
from flux_lora.config import load_config
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.lora.files import read_lora
from flux_lora.lora.runtime import apply_loras, remove_loras
from flux_lora.model.text_encoders import TextEncoders
from flux_lora.toy.scenes import keep_scenes, make_scenes, parse_caption
from flux_lora.toy.scorer import accuracy, score_image
from flux_lora.weights.loading import load_autoencoder, load_flow_model

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("toy_quality")
TOY_CONFIG = ROOT / "configs" / "toy.yaml"
HELD_OUT_SEED = 1000  # scenes the toy model was not trained on (it trained on seed 0)


@dataclass(frozen=True)
class Base:
    name: str
    dtype: torch.dtype
    quantize: str | None
    fp8_scale: str = "row"


BASES = (
    Base("float32", torch.float32, None),
    Base("bf16", torch.bfloat16, None),
    Base("fp8 scaled (default)", torch.bfloat16, "float8_e4m3fn", "row"),
    Base("fp8 plain cast", torch.bfloat16, "float8_e4m3fn", "none"),
)


def load_pipeline(model: Path, base: Base) -> FluxPipeline:
    ae = load_autoencoder(model, dtype=torch.float32, device="cpu")
    dit = load_flow_model(
        model, dtype=base.dtype, device="cpu", quantize=base.quantize, per_channel_scale=base.fp8_scale == "row"
    )
    text = TextEncoders.from_folder(model, dit.params.max_sequence_length, dtype=torch.float32, device="cpu")
    return FluxPipeline(dit, ae, text, device="cpu", dtype=base.dtype)


def generate(pipe: FluxPipeline, prompts: list[str], size: int = 64) -> np.ndarray:
    """One image per prompt, seed ``i`` for prompt ``i``: ``[N, H, W, 3]`` uint8."""
    images = []
    for i, prompt in enumerate(prompts):
        out = pipe(prompt, height=size, width=size, seed=i, output_type="pt", progress=False)
        images.append((out[0].float().permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
    return np.stack(images)


def prompt_accuracy(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    pairs = [(score_image(img).labels, parse_caption(p)) for img, p in zip(images, prompts, strict=True)]
    result = accuracy(pairs)
    attributes = list(result)
    all_right = [all(getattr(seen, a) == getattr(want, a) for a in attributes) for seen, want in pairs]
    return {"all": float(np.mean(all_right)), **result}


def pink_prompts() -> list[str]:
    return [str(p) for p in load_config(TOY_CONFIG, []).sample.prompts]


def train_lora(base: Base, out: Path, steps: int) -> Path:
    argv = [
        "--config",
        str(TOY_CONFIG),
        f"--output_dir={out}",
        f"--data.cache_dir={out / 'cache'}",
        f"--train.max_steps={steps}",
        "--train.checkpoint_every_n_steps=0",
        f"--model.dtype={'float32' if base.dtype == torch.float32 else 'bfloat16'}",
        f"--model.fp8_scale={base.fp8_scale}",
        "--sample.prompts=[]",
        "--sample.keep_prompts=[]",
    ]
    if base.quantize:
        argv.append(f"--model.quantize={base.quantize}")
    if train_main(argv) != 0:
        raise RuntimeError(f"training the LoRA on the {base.name} base failed")
    return out / "toy.safetensors"


def concept_accuracy(images: np.ndarray) -> float:
    return float(np.mean([score_image(img).labels.colour == "pink" for img in images]))


def run(args: argparse.Namespace) -> dict:
    prompts = [s.caption for s in make_scenes(args.prompts, HELD_OUT_SEED)]
    pinks = pink_prompts()
    keep = [s.caption for s in keep_scenes()]
    rows, images, grid = [], {}, {}
    for base in BASES:
        started = time.monotonic()
        pipe = load_pipeline(args.model, base)
        images[base.name] = generate(pipe, prompts)
        row = {"base": base.name, "prompt_accuracy": prompt_accuracy(images[base.name], prompts)}
        if not args.skip_lora:
            before = generate(pipe, pinks)
            row["pink_before"] = concept_accuracy(before)
            row["keep_before"] = prompt_accuracy(generate(pipe, keep), keep)
            with tempfile.TemporaryDirectory() as tmp:
                lora = train_lora(base, Path(tmp) / "run", args.lora_steps)
                apply_loras(pipe.dit, [(read_lora(lora, pipe.dit.params), 1.0, "pink")])
                after = generate(pipe, pinks)
                row["pink_after"] = concept_accuracy(after)
                row["keep_after"] = prompt_accuracy(generate(pipe, keep), keep)
                remove_loras(pipe.dit)
            if base.quantize and base.fp8_scale == "row":  # the default base: the README's picture
                grid = {"the toy model (fp8), held-out prompts": images[base.name][: len(pinks)]}
                grid |= {"pink prompts, before the LoRA": before, "after 300 steps of LoRA": after}
        row["seconds"] = round(time.monotonic() - started, 1)
        rows.append(row)
        log.info("%s", row)
    for row in rows:
        mine = images[row["base"]].astype(np.float64)
        row["pixel_error_vs_bf16"] = float(np.abs(mine - images["bf16"]).mean())
        row["pixel_error_vs_float32"] = float(np.abs(mine - images["float32"]).mean())
    if args.grid and grid:
        save_grid(grid, args.grid)
    return {
        "model": str(args.model),
        "prompts": len(prompts),
        "pink_prompts": len(pinks),
        "keep_prompts": len(keep),
        "rows": rows,
    }


def save_grid(rows: dict[str, np.ndarray], path: Path, zoom: int = 2) -> None:
    """Rows of images (each ``[N, H, W, 3]``), ``zoom`` x larger, a caption line above each row."""
    label_h = 14
    tiles = [np.concatenate(list(images), axis=1) for images in rows.values()]
    width = max(t.shape[1] for t in tiles) * zoom
    canvas = Image.new("RGB", (width, sum(label_h + t.shape[0] * zoom for t in tiles)), (255, 255, 255))
    draw, y = ImageDraw.Draw(canvas), 0
    for label, tile in zip(rows, tiles, strict=True):
        draw.text((4, y + 1), label, fill=(0, 0, 0))
        image = Image.fromarray(tile).resize((tile.shape[1] * zoom, tile.shape[0] * zoom), Image.Resampling.NEAREST)
        canvas.paste(image, (0, y + label_h))
        y += label_h + image.height
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    write_bytes_atomic(path, buffer.getvalue())


def table(result: dict) -> str:
    lines = [
        "| base | prompt accuracy (all / shape / colour / position / size) | pink before -> after LoRA "
        "| keep colour / shape before -> after LoRA | pixel error vs bf16 | vs float32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        acc = r["prompt_accuracy"]
        parts = " / ".join(f"{100 * acc[k]:.0f}" for k in ("all", "shape", "colour", "position", "size"))
        pink = f"{100 * r['pink_before']:.0f} % -> {100 * r['pink_after']:.0f} %" if "pink_after" in r else "-"
        keep = "-"
        if "keep_after" in r:
            b, a = r["keep_before"], r["keep_after"]
            keep = " -> ".join(f"{100 * k['colour']:.0f} / {100 * k['shape']:.0f} %" for k in (b, a))
        lines.append(
            f"| {r['base']} | {parts} % | {pink} | {keep} | {r['pixel_error_vs_bf16']:.2f} "
            f"| {r['pixel_error_vs_float32']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "flux-toy")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--grid", type=Path, help="also write a PNG of base and LoRA samples (the fp8 base)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    result = run(args)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(table(result))  # noqa: T201 - the report is the output
    return 0


if __name__ == "__main__":
    sys.exit(main())
