"""Convert a FLUX LoRA file from any readable layout to the kohya or the diffusers layout.

    flux-lora-convert IN.safetensors OUT.safetensors --to kohya [--model flux-dev]

(from a checkout also ``python -m flux_lora.lora.convert ...``).

``--model`` is a preset name (``flux-dev``, ``flux-schnell``, ...) or a model folder / DiT file whose
architecture is read from its headers; the LoRA's shapes are checked against it. DoRA, LoHa and LoKr files convert to
the kohya layout (LyCORIS keys); the diffusers layout takes plain LoRAs only. Exits non-zero with a message on bad
input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flux_lora.lora.files import read_lora, write_lora
from flux_lora.weights.loading import flux_params

log = logging.getLogger("flux_lora.lora.convert")


def _prog() -> str:
    """The command as it was run: the installed ``flux-lora-convert``, else ``python -m flux_lora.lora.convert``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("flux-lora") else "python -m flux_lora.lora.convert"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="LoRA file (.safetensors) in any supported layout")
    parser.add_argument("output", help="file to write")
    parser.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="layout of the output")
    parser.add_argument("--model", default="flux-dev", help="preset name or model folder / DiT file")
    parser.add_argument(
        "--no-bake",
        action="store_true",
        help="diffusers layout: write float .alpha keys instead of baking alpha/r into lora_B",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="convert the keys that can be read and leave out the rest (DoRA scales, text-encoder parts, ...)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = flux_params(args.model)
        # DoRA, LoHa and LoKr modules of whole Linears go to the kohya layout as LyCORIS keys; the diffusers
        # layout holds plain LoRAs only, and write_lora says so in one line
        lora = read_lora(args.input, params, allow_partial=args.allow_partial)
        out = write_lora(args.output, lora, params, layout=args.to, bake_scale=not args.no_bake)
    except (ValueError, OSError) as e:  # CheckpointError and LoraFormatError are ValueErrors naming the file
        log.error("cannot convert %s: %s", args.input, e)
        return 1
    log.info("wrote %s: %s layout, %d modules", out, args.to, len(lora))
    return 0


if __name__ == "__main__":
    sys.exit(main())
