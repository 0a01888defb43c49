"""Generate images with FLUX.1 (dev or schnell), optionally with LoRAs, and write PNGs with their settings.

    python examples/generate.py --model /path/to/FLUX.1-dev --prompt "a photo of a dog" \\
        --lora style.safetensors:0.8 --quantize float8_e4m3fn --offload model --seed 42 --output dog.png

With ControlNets (each ``--controlnet`` takes the options that follow it; it may repeat):

    python examples/generate.py --model /path/to/FLUX.1-dev --prompt "a house by a lake" \\
        --controlnet InstantX/FLUX.1-dev-Controlnet-Union:0.7 --control-image edges.png --control-mode canny \\
        --controlnet jasperai/Flux.1-dev-Controlnet-Depth --control-image depth.png --control-end 0.5

``--model`` is a folder in the FLUX.1 layout or a hub id (``hf:owner/name``, ``ms:owner/name``, bare: ModelScope).
``--lora FILE[:SCALE]`` may repeat (scale 1 by default). ``--controlnet ID_OR_PATH[:SCALE]`` is a diffusers-layout
ControlNet folder or a hub id (``hf:InstantX/FLUX.1-dev-Controlnet-Union``); after
it come its ``--control-image`` (required; for upscaler and tile modes the low-resolution image itself),
``--control-mode`` (union ControlNets), ``--mask`` (inpainting ControlNets; white = repaint) and
``--control-start`` / ``--control-end`` (the fraction of the steps it acts on). ``--quantize`` applies to the
ControlNets too. Image ``i`` of ``--num-images N`` uses seed ``SEED + i`` and is written to ``OUTPUT-i.png``
(just ``OUTPUT`` when N is 1); the prompt, seed, steps, guidance, model, LoRAs, ControlNets and quantization go
into the PNG's text chunks, so the same settings give the same file byte for byte.
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

from flux_lora.inference.control import ControlNetUnit
from flux_lora.inference.pipeline import DEFAULT_GUIDANCE, FluxPipeline
from flux_lora.lora.runtime import apply_loras

log = logging.getLogger("generate")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def split_scale(spec: str) -> tuple[str, float]:
    """``NAME[:SCALE]`` -> ``(name, scale)``; a colon not followed by a number belongs to the name."""
    name, sep, scale = spec.rpartition(":")
    if sep and name:
        try:
            return name, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def lora_spec(spec: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> ``(path, scale)``."""
    path, scale = split_scale(spec)
    return Path(path), scale


class ControlNetOption(argparse.Action):
    """``--controlnet`` starts a ControlNet; the ``--control-*`` and ``--mask`` options after it belong to it."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        units = [dict(u) for u in namespace.controlnets]  # copies: the default list is shared between parses
        if self.dest == "controlnet":
            source, scale = split_scale(value)
            units.append({"controlnet": source, "scale": scale})
        elif not units:
            parser.error(f"{option_string} {value}: give --controlnet first (options after a --controlnet apply to it)")
        elif self.dest in units[-1]:
            parser.error(
                f"{option_string} given twice for --controlnet {units[-1]['controlnet']} (each "
                f"--controlnet takes one; repeat --controlnet for more)"
            )
        else:
            units[-1][self.dest] = value
        namespace.controlnets = units


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (FLUX.1 layout) or hub id: hf:owner/name, ms:owner/name, owner/name (ModelScope)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="used with --true-cfg != 1 (default: empty)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true classifier-free guidance scale")
    p.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="FILE[:SCALE]")
    p.add_argument("--lora-mode", choices=["unfused", "fused"], default="unfused")
    p.add_argument("--quantize", choices=["float8_e4m3fn"], default=None, help="store the DiT and ControlNets in fp8")
    p.set_defaults(controlnets=[])
    cn = p.add_argument_group("ControlNets (options after a --controlnet apply to it)")
    cn.add_argument("--controlnet", action=ControlNetOption, metavar="ID_OR_PATH[:SCALE]")
    cn.add_argument("--control-image", dest="image", type=Path, action=ControlNetOption, metavar="IMAGE")
    cn.add_argument("--control-mode", dest="mode", action=ControlNetOption, help="union ControlNets: canny, ...")
    cn.add_argument("--mask", type=Path, action=ControlNetOption, help="inpainting ControlNets: white = repaint")
    cn.add_argument("--control-start", dest="start", type=float, action=ControlNetOption, metavar="FRACTION")
    cn.add_argument("--control-end", dest="end", type=float, action=ControlNetOption, metavar="FRACTION")
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
    images = sum("image" in u for u in args.controlnets)
    for unit in args.controlnets:
        if "image" not in unit:
            p.error(
                f"--controlnet {unit['controlnet']} has no --control-image ({len(args.controlnets)} "
                f"ControlNets, {images} control images: give one --control-image after each --controlnet)"
            )
        for key in ("image", "mask"):
            if key in unit and not unit[key].is_file():
                p.error(f"--{'control-image' if key == 'image' else key} {unit[key]}: no such file")
    return args


def load_controlnets(pipe: FluxPipeline, specs: list[dict], quantize: str | None) -> list[ControlNetUnit]:
    """The ControlNets of the command line (each loaded once, however often it is named) with their inputs."""
    models, units = {}, []
    for spec in specs:
        source = spec["controlnet"]
        if source not in models:
            models[source] = pipe.load_controlnet(source, quantize=quantize)
        mask = Image.open(spec["mask"]) if "mask" in spec else None
        units.append(
            ControlNetUnit(
                models[source],
                Image.open(spec["image"]),
                mask=mask,
                mode=spec.get("mode"),
                scale=spec["scale"],
                start=spec.get("start", 0.0),
                end=spec.get("end", 1.0),
            )
        )
    return units


def controlnet_settings(specs: list[dict]) -> list[dict]:
    """The ControlNet options as written into the PNG (paths as given)."""
    return [
        {
            "controlnet": s["controlnet"],
            "scale": s["scale"],
            "image": str(s["image"]),
            "mode": s.get("mode"),
            "mask": str(s["mask"]) if "mask" in s else None,
            "start": s.get("start", 0.0),
            "end": s.get("end", 1.0),
        }
        for s in specs
    ]


def load_loras(pipe: FluxPipeline, specs: list[tuple[Path, float]], mode: str) -> list[str]:
    """Read and apply the LoRA files; returns ``FILE:SCALE`` labels for the metadata."""
    if not specs:
        return []
    from flux_lora.lora.files import read_lora

    loras, names = [], set()
    for i, (path, scale) in enumerate(specs):
        name = path.stem.replace(".", "_") or f"lora{i}"
        name = name if name not in names else f"{name}_{i}"
        names.add(name)
        loras.append((read_lora(path, pipe.dit.params), scale, name))
    adapter_dtype = torch.float32 if pipe.dtype == torch.float32 else torch.bfloat16
    apply_loras(pipe.dit, loras, mode=mode, dtype=adapter_dtype)
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
    pipe = FluxPipeline.from_pretrained(
        args.model, quantize=args.quantize, dtype=DTYPES[args.dtype], device=args.device, offload=offload
    )
    loras = load_loras(pipe, args.lora, args.lora_mode)
    controlnets = load_controlnets(pipe, args.controlnets, args.quantize)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    height, width = pipe.image_size(args.height, args.width)
    steps = pipe.dit.params.default_steps if args.steps is None else args.steps
    dev = pipe.dit.params.guidance_embed
    guidance = (DEFAULT_GUIDANCE if args.guidance is None else args.guidance) if dev else None
    negative = args.negative_prompt if args.true_cfg != 1.0 else None
    written = []
    for i in range(args.num_images):
        # schnell gets the user's --guidance only so that the pipeline can warn that it is ignored
        image = pipe(
            args.prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance=guidance if dev else args.guidance,
            true_cfg=args.true_cfg,
            negative_prompt=negative,
            seed=seed + i,
            controlnets=controlnets,
            progress=not args.quiet,
        )[0]
        settings = {
            "prompt": args.prompt,
            "seed": seed + i,
            "steps": steps,
            "guidance": guidance,
            "width": width,
            "height": height,
            "model": str(args.model),
            "loras": loras,
            "lora_mode": args.lora_mode,
            "controlnets": controlnet_settings(args.controlnets),
            "quantize": args.quantize or "none",
            "sampler": "euler (flow matching)",
        }
        if args.true_cfg != 1.0:
            settings.update(true_cfg=args.true_cfg, negative_prompt=negative or "")
        path = output_path(args.output, i, args.num_images)
        save_png(image, path, settings)
        log.info("wrote %s (seed %d)", path, seed + i)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
