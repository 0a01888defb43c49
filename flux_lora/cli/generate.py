"""Generate images with FLUX.1 (dev or schnell), optionally with LoRAs, and write PNGs with their settings.

Installed as ``flux-lora-generate`` (also ``python -m flux_lora.cli.generate`` or ``python examples/generate.py``)::

    flux-lora-generate --model /path/to/FLUX.1-dev --prompt "a photo of a dog" \\
        --lora style.safetensors:0.8 --quantize float8_e4m3fn --offload model --seed 42 --output dog.png

With ControlNets (each ``--controlnet`` takes the options that follow it; it may repeat):

    flux-lora-generate --model /path/to/FLUX.1-dev --prompt "a house by a lake" \\
        --controlnet InstantX/FLUX.1-dev-Controlnet-Union:0.7 --control-image edges.png --control-mode canny \\
        --controlnet jasperai/Flux.1-dev-Controlnet-Depth --control-image depth.png --control-end 0.5

``--model`` is a folder in the FLUX.1 layout or a hub id (``hf:owner/name``, ``ms:owner/name``, bare: ModelScope).
``--lora FILE[:SCALE]`` may repeat (scale 1 by default). ``--controlnet ID_OR_PATH[:SCALE]`` is a diffusers-layout
ControlNet folder or a hub id (``hf:InstantX/FLUX.1-dev-Controlnet-Union``); after
it come its ``--control-image`` (required; for upscaler and tile modes the low-resolution image itself),
``--control-mode`` (union ControlNets), ``--mask`` (inpainting ControlNets; white = repaint) and
``--control-start`` / ``--control-end`` (the fraction of the steps it acts on). ``--quantize`` applies to the
ControlNets too. ``--seed`` takes one or more seeds, one image each; with one seed ``S``, ``--num-images N``
makes ``N`` images with seeds ``S, S+1, ...``. Each image's noise comes from its own seed, so ``--batch-size``
(images per DiT call) changes speed and memory, not the pictures (beyond float rounding). ``--image PATH
--strength S`` starts from a picture (image to image; strength 0 keeps it, 1 ignores it; default 0.6); without
``--height``/``--width`` the picture's size is used, rounded down to multiples of 16. ``--reference-image PATH``
(FLUX.1 Kontext) edits a picture by the prompt: its tokens join the DiT's input at every step (not img2img's
start); the output size defaults to the Kontext resolution nearest its aspect ratio. Without ``--output`` the
images are numbered ``output_00001.png``, ... after the highest number in the current folder; with
``--output OUT`` they are ``OUT`` (one image) or ``OUT-i.png``, and an existing file needs ``--overwrite``.
``--prompt-file FILE`` (one prompt a line) instead of ``--prompt`` makes those images for each prompt in turn. The
PNG holds an A1111-style ``parameters`` text (prompt, steps, sampler, guidance, seed, size, model, ``Lora
hashes``) and every setting as JSON in a ``flux_lora`` chunk, so the same settings give the same file byte for
byte.

LoRA files (their text-encoder parts against the encoders' config.json), the autoencoder, ControlNet configs
and control images are checked before the DiT loads; bad input
stops with a one-line error and exit status 1. LoRA files may hold DoRA, LoHa, LoKr, diff and text-encoder
parts (applied to CLIP-L and T5), and BFL control LoRAs (FLUX.1-Canny/Depth-dev-lora: norm overrides, img_in
widened for structure latents; give ``--structure-image``); a key that cannot be applied is an error unless
``--allow-partial``.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from flux_lora.dtypes import DTYPES, QUANTIZE_VALUES, Quantize
from flux_lora.inference.control import ControlNetUnit
from flux_lora.inference.kontext import preferred_size
from flux_lora.inference.outputs import file_hash, numbered_paths, save_png
from flux_lora.inference.pipeline import FluxPipeline, model_folder
from flux_lora.lora.encoders import is_text_encoder_key, read_text_encoder_lora
from flux_lora.lora.files import read_lora
from flux_lora.lora.patches import DoraNorm, NormOverride, input_width
from flux_lora.lora.runtime import LoraSpec, apply_loras
from flux_lora.model.controlnet import check_compatible
from flux_lora.model.flux import FluxParams
from flux_lora.model.text_encoders import TextEncoders
from flux_lora.names import SIDE_MULTIPLE
from flux_lora.weights.controlnet_loading import find_controlnet_folder, read_controlnet_params, resolve_controlnet
from flux_lora.weights.loading import flux_params
from flux_lora.weights.safetensors_io import read_keys

log = logging.getLogger("flux_lora.generate")


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

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        value: Any,
        option_string: str | None = None,
    ) -> None:
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
    first, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(
        description=first, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest.strip()
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (FLUX.1 layout) or hub id: hf:owner/name, ms:owner/name, owner/name (ModelScope)",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument(
        "--prompt-file", type=Path, default=None, help="a text file of prompts, one per line (blank lines skipped)"
    )
    p.add_argument("--negative-prompt", default=None, help="used with --true-cfg != 1 (default: empty)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true classifier-free guidance scale")
    p.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="FILE[:SCALE]")
    p.add_argument(
        "--lora-mode",
        choices=["unfused", "fused"],
        default="unfused",
        help="fused: added into the weights (on an fp8 DiT re-quantized, which is not exact)",
    )
    p.add_argument("--allow-partial", action="store_true", help="apply LoRAs even when some keys cannot be applied")
    p.add_argument(
        "--dora-norm",
        choices=["peft", "comfyui"],
        default="peft",
        help="DoRA files with one magnitude per output row: divide by the row norm of W + dW (peft, LyCORIS, "
        "which train them) or of W (ComfyUI's weight_decompose)",
    )
    p.add_argument("--quantize", choices=QUANTIZE_VALUES, default=None, help="store the DiT and ControlNets in fp8")
    p.set_defaults(controlnets=[])
    cn = p.add_argument_group("ControlNets (options after a --controlnet apply to it)")
    cn.add_argument("--controlnet", action=ControlNetOption, metavar="ID_OR_PATH[:SCALE]")
    cn.add_argument("--control-image", dest="image", type=Path, action=ControlNetOption, metavar="IMAGE")
    cn.add_argument("--control-mode", dest="mode", action=ControlNetOption, help="union ControlNets: canny, ...")
    cn.add_argument("--mask", type=Path, action=ControlNetOption, help="inpainting ControlNets: white = repaint")
    cn.add_argument("--control-start", dest="start", type=float, action=ControlNetOption, metavar="FRACTION")
    cn.add_argument("--control-end", dest="end", type=float, action=ControlNetOption, metavar="FRACTION")
    p.add_argument(
        "--structure-image",
        type=Path,
        default=None,
        help="control image (edges, depth) for a FLUX control LoRA (FLUX.1-Canny/Depth-dev-lora) among --lora",
    )
    p.add_argument("--offload", choices=["none", "model", "block"], default="none")
    p.add_argument("--height", type=int, default=None, help="default: the --image's, else 1024")
    p.add_argument("--width", type=int, default=None, help="default: the --image's, else 1024")
    p.add_argument("--image", type=Path, default=None, help="image to image: start from this picture")
    p.add_argument("--strength", type=float, default=None, help="with --image: 0 keeps it, 1 ignores it (0.6)")
    p.add_argument(
        "--reference-image",
        type=Path,
        default=None,
        help="FLUX.1 Kontext: the image to edit (its tokens join the DiT's input; the output size defaults to "
        "the Kontext resolution nearest its aspect ratio)",
    )
    p.add_argument(
        "--reference-size",
        choices=["preferred", "keep"],
        default="preferred",
        help="the reference is encoded at the Kontext resolution nearest its aspect ratio (preferred, as BFL and "
        "diffusers do) or at its own size (keep)",
    )
    p.add_argument("--steps", type=int, default=None, help="default: 28 for dev, 4 for schnell")
    p.add_argument("--guidance", type=float, default=None, help="embedded guidance (dev 3.5, Kontext 2.5 by default)")
    p.add_argument(
        "--seed", type=int, nargs="+", default=None, help="one or more; default: random (written into the PNG)"
    )
    p.add_argument("--num-images", type=int, default=None, help="with one seed S: seeds S, S+1, ... (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per DiT call (same seeds, same images)")
    p.add_argument("--output", type=Path, default=None, help="default: output_NNNNN.png, numbered")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="compute dtype")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = p.parse_args(argv)
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and value < SIDE_MULTIPLE:
            p.error(f"--{side} must be at least {SIDE_MULTIPLE}, got {value}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    try:
        args.prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
    except ValueError as e:
        p.error(str(e))
    for path, _ in args.lora:
        if not path.is_file():
            p.error(f"--lora {path}: no such file")
    try:
        args.seeds = seed_list(args.seed, args.num_images)
    except ValueError as e:
        p.error(str(e))
    args.num_images = len(args.seeds) * len(args.prompts)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image is None and args.strength is not None:
        p.error("--strength is for image to image: give --image too")
    if args.structure_image is not None and not args.structure_image.is_file():
        p.error(f"--structure-image {args.structure_image}: no such file")
    if args.image is not None and not args.image.is_file():
        p.error(f"--image {args.image}: no such file")
    if args.reference_image is not None and not args.reference_image.is_file():
        p.error(f"--reference-image {args.reference_image}: no such file")
    if args.strength is not None and not 0 <= args.strength <= 1:
        p.error(f"--strength must be in [0, 1], got {args.strength}")
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


def read_prompts(path: Path) -> list[str]:
    """The prompts of a ``--prompt-file``: one per line, stripped, blank lines skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt-file {path}: cannot be read ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path} holds no prompt")
    return prompts


def guidance_used(dit: torch.nn.Module) -> bool:
    """Whether the DiT's guidance input changes anything: it has one, and its output layer is not all zero (the
    toy model's is held at zero: any guidance value gives the same image)."""
    layer = getattr(getattr(dit, "guidance_in", None), "out_layer", None)
    if layer is None:
        return False
    return any(bool(t.detach().float().count_nonzero()) for t in (layer.weight, layer.bias) if t is not None)


def seed_list(seeds: list[int] | None, num_images: int | None) -> list[int]:
    """The seed of each image: several ``--seed``, or ``S, S+1, ...`` for ``--num-images`` (S random if not given)."""
    if num_images is not None and num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    if seeds is not None and len(seeds) > 1:
        if num_images not in (None, len(seeds)):
            raise ValueError(f"{len(seeds)} seeds but --num-images {num_images}: give one seed, or one per image")
        return list(seeds)
    first = seeds[0] if seeds else secrets.randbelow(2**31)
    return [first + i for i in range(num_images or 1)]


def load_controlnets(
    pipe: FluxPipeline, specs: list[dict[str, Any]], images: dict[Path, Image.Image], quantize: Quantize | None
) -> list[ControlNetUnit]:
    """The ControlNets of the command line (each loaded once, however often it is named) with their inputs."""
    models, units = {}, []
    for spec in specs:
        source = spec["controlnet"]
        if source not in models:
            models[source] = pipe.load_controlnet(source, quantize=quantize)
        units.append(
            ControlNetUnit(
                models[source],
                images[spec["image"]],
                mask=images[spec["mask"]] if "mask" in spec else None,
                mode=spec.get("mode"),
                scale=spec["scale"],
                start=spec.get("start", 0.0),
                end=spec.get("end", 1.0),
            )
        )
    return units


def controlnet_settings(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


class Checked(NamedTuple):
    """What is read and checked before the DiT loads."""

    folder: Path
    params: FluxParams
    loras: list[LoraSpec]  # the DiT parts
    te_loras: list[LoraSpec]  # the text-encoder parts (of the files that have them)
    lora_hashes: dict[str, str]  # name -> first 10 hex of the file's sha256
    images: dict[Path, Image.Image]  # control images and masks
    outputs: list[Path]


def read_loras(
    specs: list[tuple[Path, float]], folder: Path, params: FluxParams, allow_partial: bool, dora_norm: DoraNorm = "peft"
) -> tuple[list[LoraSpec], list[LoraSpec]]:
    """Read every LoRA file (layout, shapes, finite values, keys) as ``(weights, scale, unique name)``: its DiT
    parts and its text-encoder parts, the latter checked against encoders built from the model folder's
    ``text_encoder*/config.json`` on the meta device (no weights load)."""
    dit: list[LoraSpec] = []
    te: list[LoraSpec] = []
    names: set[str] = set()
    encoders = None
    for i, (path, scale) in enumerate(specs):
        name = path.stem.replace(".", "_") or f"lora{i}"
        name = name if name not in names else f"{name}_{i}"
        names.add(name)
        lora = read_lora(path, params, allow_partial=allow_partial, skip_text_encoders=True, dora_norm=dora_norm)
        dit.append((lora, scale, name))
        if any(is_text_encoder_key(k) for k in read_keys(path)):
            encoders = encoders or TextEncoders.skeleton(folder, params.max_sequence_length)
            te.append((read_text_encoder_lora(path, encoders, allow_partial=allow_partial), scale, name))
    return dit, te


def apply_all(pipe: FluxPipeline, checked: Checked, mode: str) -> None:
    """The DiT and text-encoder parts of the LoRA files, read and checked before anything loaded."""
    dtype = torch.float32 if pipe.dtype == torch.float32 else torch.bfloat16
    for model, loras in ((pipe.dit, checked.loras), (pipe.text_encoders, checked.te_loras)):
        loras = [spec for spec in loras if spec[0]]
        if loras:
            apply_loras(model, loras, mode=mode, dtype=dtype)  # type: ignore[arg-type]


def open_image(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except OSError as e:
        raise ValueError(f"{what} {path}: not a readable image ({e})") from None


def check_controlnets(specs: list[dict[str, Any]], params: FluxParams) -> None:
    """Each ControlNet's config.json against the DiT's headers (the weights load later)."""
    for source in dict.fromkeys(s["controlnet"] for s in specs):
        cn = read_controlnet_params(find_controlnet_folder(resolve_controlnet(source)))
        check_compatible(cn, params, f"ControlNet {source}")


def check_structure_image(loras: list[LoraSpec], params: FluxParams, image: Path | None) -> None:
    """A control LoRA (img_in taking image + structure latents) needs ``--structure-image``, and only one does."""
    wide = [
        name
        for weights, _, name in loras
        if not isinstance(change := weights.get("img_in"), NormOverride | None)
        and (input_width(change) or 0) > params.in_channels
    ]
    if wide and image is None:
        raise ValueError(f"--lora {wide[0]} is a FLUX control LoRA (Canny/Depth): give --structure-image")
    if image is not None and not wide:
        raise ValueError(f"--structure-image {image}: no --lora is a FLUX control LoRA (Canny/Depth) to take it")


def output_paths(args: argparse.Namespace) -> list[Path]:
    if args.output is None:
        return numbered_paths(Path.cwd(), "output", args.num_images)
    out = args.output
    paths = (
        [out]
        if args.num_images == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(args.num_images)]
    )
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{', '.join(existing)} exists; pass --overwrite to replace it")
    return paths


def preflight(args: argparse.Namespace) -> Checked:
    """Everything that can be checked from headers and small files, before any large weights load."""
    outputs = output_paths(args)
    folder = model_folder(args.model, option="--model")
    params = flux_params(folder)  # the DiT's headers only
    loras, te_loras = read_loras(args.lora, folder, params, args.allow_partial, args.dora_norm)
    hashes = {name: file_hash(path) for (path, _), (_, _, name) in zip(args.lora, loras, strict=True)}
    check_controlnets(args.controlnets, params)
    check_structure_image(loras, params, args.structure_image)
    images = {} if args.image is None else {args.image: open_image(args.image, "--image")}
    if args.reference_image is not None:
        images[args.reference_image] = open_image(args.reference_image, "--reference-image")
        if not params.guidance_embed:
            raise ValueError(f"--reference-image needs a FLUX.1 Kontext model; {args.model} is schnell-type")
        if not params.kontext:
            log.warning("%s is not a FLUX.1 Kontext model: the reference image is appended all the same", args.model)
    if args.structure_image is not None:
        images[args.structure_image] = open_image(args.structure_image, "--structure-image")
    for unit in args.controlnets:
        images[unit["image"]] = open_image(unit["image"], "--control-image")
        if "mask" in unit:
            images[unit["mask"]] = open_image(unit["mask"], "--mask")
    return Checked(folder, params, loras, te_loras, hashes, images, outputs)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet:
        quiet_libraries()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars: our own bar says how far it got
    checked = preflight(args)
    offload = None if args.offload == "none" else args.offload
    pipe = FluxPipeline.from_pretrained(
        checked.folder, quantize=args.quantize, dtype=DTYPES[args.dtype], device=args.device, offload=offload
    )
    apply_all(pipe, checked, args.lora_mode)
    controlnets = load_controlnets(pipe, args.controlnets, checked.images, args.quantize)
    init = checked.images.get(args.image) if args.image is not None else None
    reference = checked.images.get(args.reference_image) if args.reference_image is not None else None
    height, width = pipe.image_size(*output_size(args, init, reference))
    steps = pipe.dit.params.default_steps if args.steps is None else args.steps
    dev = pipe.dit.params.guidance_embed
    guidance = (pipe.dit.params.default_guidance if args.guidance is None else args.guidance) if dev else None
    recorded_guidance = guidance if dev and guidance_used(pipe.dit) else None  # what the PNG says was used
    negative = args.negative_prompt if args.true_cfg != 1.0 else None
    strength = 1.0 if init is None else (0.6 if args.strength is None else args.strength)
    ds = pipe.ae.params.downscale_factor
    written = []
    batches = range(0, len(args.seeds), args.batch_size)
    for number, prompt, first in [(i, p, b) for i, p in enumerate(args.prompts) for b in batches]:
        seeds = args.seeds[first : first + args.batch_size]
        noise = torch.cat([pipe.noise(1, height // ds, width // ds, torch.Generator().manual_seed(s)) for s in seeds])
        # schnell gets the user's --guidance only so that the pipeline can warn that it is ignored
        images = pipe(
            prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance=guidance if dev else args.guidance,
            true_cfg=args.true_cfg,
            negative_prompt=negative,
            num_images_per_prompt=len(seeds),
            latents=noise,
            controlnets=controlnets,
            image=init,
            strength=strength,
            control_image=checked.images.get(args.structure_image) if args.structure_image else None,
            reference_image=reference,
            reference_size=args.reference_size,
            progress=not args.quiet,
        )
        start = number * len(args.seeds) + first
        for seed, image, path in zip(seeds, images, checked.outputs[start:], strict=False):
            settings = {
                "prompt": prompt,
                "seed": seed,
                "steps": steps,
                "guidance": recorded_guidance,
                "width": width,
                "height": height,
                "model": str(args.model),
                "loras": [f"{p.name}:{scale:g}" for p, scale in args.lora],
                "lora_hashes": checked.lora_hashes,
                "lora_mode": args.lora_mode,
                "controlnets": controlnet_settings(args.controlnets),
                "quantize": args.quantize or "none",
                "sampler": "euler (flow matching)",
            }
            if args.true_cfg != 1.0:
                settings.update(true_cfg=args.true_cfg, negative_prompt=negative or "")
            if init is not None:
                settings.update(image=str(args.image), strength=strength)
            if args.structure_image is not None:
                settings.update(structure_image=str(args.structure_image))
            if reference is not None:
                settings.update(reference_image=str(args.reference_image), reference_size=args.reference_size)
            save_png(image, path, settings, overwrite=args.overwrite)
            log.info("wrote %s (seed %d)", path, seed)
            written.append(path)
    return written


def output_size(
    args: argparse.Namespace, init: Image.Image | None, reference: Image.Image | None = None
) -> tuple[int, int]:
    """``(height, width)`` as given, else the --image's size, else the Kontext resolution nearest the
    --reference-image's aspect ratio (as BFL's sampler), else 1024 (rounded to multiples of 16 later)."""
    h0, w0 = (1024, 1024) if init is None else (init.height, init.width)
    if init is None and reference is not None:
        w0, h0 = preferred_size(reference.width, reference.height)
    return (args.height or h0), (args.width or w0)


def quiet_libraries() -> None:
    """No progress bars, info or warnings from the libraries either (``--quiet`` prints only errors)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore")


def cli(argv: list[str] | None = None) -> int:
    """``main`` with bad input reported as one line on stderr and exit status 1 (no traceback)."""
    try:
        main(argv)
    except (ValueError, OSError) as e:  # CheckpointError, LoraFormatError: ValueErrors naming the file or key
        log.error("error: %s", " ".join(str(e).split()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
