"""Generate images with FLUX.1 (dev or schnell), optionally with LoRAs, and write PNGs with their settings.

    python examples/generate.py --model /path/to/FLUX.1-dev --prompt "a photo of a dog" \\
        --lora style.safetensors:0.8 --quantize float8_e4m3fn --offload model --seed 42 --output dog.png

``--model`` is a folder in the FLUX.1 layout or a ModelScope id. ``--lora FILE[:SCALE]`` may repeat (scale 1 by
default). Image ``i`` of ``--num-images N`` uses seed ``SEED + i`` and is written to ``OUTPUT-i.png`` (just
``OUTPUT`` when N is 1); the prompt, seed, steps, guidance, model, LoRAs and quantization go into the PNG's
text chunks, so the same settings give the same file byte for byte.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path

try:
    import flux_lora  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image, PngImagePlugin

from flux_lora.adapters import apply_loras
from flux_lora.pipeline import DEFAULT_GUIDANCE, FluxPipeline

log = logging.getLogger("generate")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def lora_spec(spec: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> ``(path, scale)``; a colon not followed by a number belongs to the path."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="model folder (FLUX.1 layout) or ModelScope id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="used with --true-cfg != 1 (default: empty)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true classifier-free guidance scale")
    p.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="FILE[:SCALE]")
    p.add_argument("--lora-mode", choices=["unfused", "fused"], default="unfused")
    p.add_argument("--quantize", choices=["float8_e4m3fn"], default=None, help="store the DiT in fp8")
    p.add_argument("--offload", choices=["none", "model", "block"], default="none")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="default: 28 for dev, 4 for schnell")
    p.add_argument("--guidance", type=float, default=None, help="embedded guidance (dev; default 3.5)")
    p.add_argument("--seed", type=int, default=None, help="default: random (written into the PNG)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--output", type=Path, default=Path("output.png"))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="compute dtype")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    args = p.parse_args(argv)
    for path, _ in args.lora:
        if not path.is_file():
            p.error(f"--lora {path}: no such file")
    if args.num_images < 1:
        p.error(f"--num-images must be >= 1, got {args.num_images}")
    return args


def load_loras(pipe: FluxPipeline, specs: list[tuple[Path, float]], mode: str) -> list[str]:
    """Read and apply the LoRA files; returns ``FILE:SCALE`` labels for the metadata."""
    if not specs:
        return []
    from flux_lora.lora_formats import read_lora

    loras, names = [], set()
    for i, (path, scale) in enumerate(specs):
        name = path.stem.replace(".", "_") or f"lora{i}"
        name = name if name not in names else f"{name}_{i}"
        names.add(name)
        loras.append((read_lora(path, pipe.model.params), scale, name))
    adapter_dtype = torch.float32 if pipe.dtype == torch.float32 else torch.bfloat16
    apply_loras(pipe.model, loras, mode=mode, dtype=adapter_dtype)
    return [f"{path.name}:{scale:g}" for path, scale in specs]


def png_info(settings: dict) -> PngImagePlugin.PngInfo:
    """Each setting as a text chunk, plus ``parameters`` (one JSON object with all of them)."""
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("parameters", json.dumps(settings, sort_keys=True))
    return info


def save_png(image: Image.Image, path: Path, settings: dict) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(settings))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_path(output: Path, index: int, count: int) -> Path:
    return output if count == 1 else output.with_name(f"{output.stem}-{index}{output.suffix or '.png'}")


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    offload = None if args.offload == "none" else args.offload
    pipe = FluxPipeline.from_pretrained(args.model, quantize=args.quantize, dtype=DTYPES[args.dtype],
                                        device=args.device, offload=offload)
    loras = load_loras(pipe, args.lora, args.lora_mode)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    height, width = pipe.image_size(args.height, args.width)
    steps = pipe.model.params.default_steps if args.steps is None else args.steps
    dev = pipe.model.params.guidance_embed
    guidance = (DEFAULT_GUIDANCE if args.guidance is None else args.guidance) if dev else None
    negative = args.negative_prompt if args.true_cfg != 1.0 else None
    written = []
    for i in range(args.num_images):
        # schnell gets the user's --guidance only so that the pipeline can warn that it is ignored
        image = pipe(args.prompt, height=height, width=width, num_inference_steps=steps,
                     guidance=guidance if dev else args.guidance, true_cfg=args.true_cfg,
                     negative_prompt=negative, seed=seed + i, progress=not args.quiet)[0]
        settings = {"prompt": args.prompt, "seed": seed + i, "steps": steps, "guidance": guidance,
                    "width": width, "height": height, "model": str(args.model), "loras": loras,
                    "lora_mode": args.lora_mode, "quantize": args.quantize or "none",
                    "sampler": "euler (flow matching)"}
        if args.true_cfg != 1.0:
            settings.update(true_cfg=args.true_cfg, negative_prompt=negative or "")
        path = output_path(args.output, i, args.num_images)
        save_png(image, path, settings)
        log.info("wrote %s (seed %d)", path, seed + i)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
