"""Image files other tools read: A1111-style ``parameters`` text, our settings as JSON, no silent overwrite.

PNG text chunks written: ``parameters`` (the A1111 / Forge infotext that Civitai, A1111, Forge and most image
browsers parse: prompt, ``Negative prompt:``, then ``Steps: ..., Sampler: ..., Seed: ..., Lora hashes: ...``) and
``flux_lora`` (every setting as one JSON object). No ``prompt`` or ``workflow`` chunk: ComfyUI runs
``JSON.parse`` on those when an image is dropped onto it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from flux_lora.atomic import write_atomic

SETTINGS_CHUNK = "flux_lora"
PARAMETERS_CHUNK = "parameters"


def file_hash(path: str | Path, length: int = 10) -> str:
    """The first ``length`` hex digits of the file's sha256 (Civitai's "AutoV2" for 10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def _quoted(value: str) -> str:
    """A1111 quotes values that hold its separators (``,`` ``:``) as JSON strings."""
    return json.dumps(value) if any(c in value for c in ',:\n"') else value


def a1111_parameters(settings: dict[str, Any]) -> str:
    """The A1111 infotext of ``settings`` (keys as :func:`png_info` documents)."""
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {
        "Steps": settings["steps"],
        "Sampler": "Euler",
        "Schedule type": "Simple",
        "CFG scale": settings.get("true_cfg", 1.0),
        "Distilled CFG Scale": settings.get("guidance"),
        "Seed": settings["seed"],
        "Size": f"{settings['width']}x{settings['height']}",
        "Model": Path(str(settings["model"])).name,
        "Denoising strength": settings.get("strength"),
    }
    hashes = settings.get("lora_hashes") or {}
    if hashes:
        fields["Lora hashes"] = ", ".join(f"{name}: {h}" for name, h in hashes.items())
    fields["Version"] = "flux-lora"
    lines.append(", ".join(f"{k}: {_quoted(str(v))}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def png_info(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """``parameters`` (A1111 infotext) and ``flux_lora`` (``settings`` as JSON) text chunks.

    ``settings`` holds at least ``prompt``, ``seed``, ``steps``, ``width``, ``height``, ``model``; optionally
    ``negative_prompt``, ``true_cfg``, ``guidance``, ``lora_hashes`` (``{name: hash}``) and anything else.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_CHUNK, a1111_parameters(settings))
    info.add_text(SETTINGS_CHUNK, json.dumps(settings, sort_keys=True))
    return info


def save_png(image: Image.Image, path: Path, settings: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write atomically with the user's umask. Raises ``FileExistsError`` when ``path`` exists and ``overwrite``
    is false (also when another process creates it meanwhile)."""
    try:
        return write_atomic(
            path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(settings)), overwrite=overwrite
        )
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None


def numbered_paths(folder: Path, stem: str, count: int, suffix: str = ".png") -> list[Path]:
    """``count`` free names ``STEM_00001.png``, ... after the highest number already in ``folder``."""
    taken = [p.stem.removeprefix(f"{stem}_") for p in Path(folder).glob(f"{stem}_*{suffix}")]
    start = max((int(n) for n in taken if n.isdigit()), default=0) + 1
    return [Path(folder) / f"{stem}_{i:05d}{suffix}" for i in range(start, start + count)]
