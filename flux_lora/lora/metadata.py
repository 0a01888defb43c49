"""Safetensors header metadata of exported LoRA files.

kohya layout: ``format=pt``; kohya's ``ss_*`` keys (read by Forge / A1111 UIs and kohya's tools); the
Stability ModelSpec ``modelspec.*`` MUST keys (Forge marks a file as a FLUX LoRA by ``modelspec.architecture``
or ``modelspec.implementation``); ``sshs_model_hash`` / ``sshs_legacy_hash`` computed as kohya does; our own
``flux_lora.*`` keys. Never ``lora_adapter_metadata``: diffusers would build its LoraConfig from it and apply
the scale a second time on top of the kohya alphas. Header values are always strings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import Tensor

from flux_lora.lora.keys import LoraFormatError
from flux_lora.lora.lycoris import alpha_of, network_metadata, rank_of
from flux_lora.lora.patches import ModuleChange
from flux_lora.model.flux import FluxParams
from flux_lora.weights.loading import PARAMS_METADATA_KEY

log = logging.getLogger(__name__)

MODELSPEC_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
LAYOUT_METADATA_KEY = "flux_lora.layout"
_BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")


def check_metadata(extra: dict[str, str] | None) -> dict[str, str]:
    """A copy of ``extra``; raises ``TypeError`` naming the first entry that is not ``str -> str``."""
    extra = dict(extra or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"safetensors metadata must map str to str; entry {key!r} holds {type(value).__name__}"
                " (JSON-encode structured values)"
            )
    return extra


def architecture(params: FluxParams) -> str:
    """ModelSpec architecture of a LoRA for this model: ``flux-1-dev/lora`` or ``flux-1-schnell/lora``.

    A FLUX.1 Kontext [dev] LoRA is ``flux-1-dev/lora`` too: no loader or trainer has a Kontext value (kohya's
    sd-scripts know flux-1-dev, flux-1-schnell, chroma and flux-1; musubi-tuner writes its Kontext LoRAs as
    ``Flux.1-dev/lora``; ai-toolkit writes no ModelSpec), and Forge lists a file as a FLUX LoRA by this value."""
    return "flux-1-dev/lora" if params.guidance_embed else "flux-1-schnell/lora"


def _uniform(values: set[Any], fmt: Callable[[Any], str]) -> str:
    return fmt(next(iter(values))) if len(values) == 1 else "Dynamic"  # kohya's word for per-module values


def sshs_hashes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya computes them.

    Both hash a safetensors serialization of ``tensors`` that carries only the ``ss_*`` metadata: the model
    hash is the sha256 of the bytes after the header (the tensor data, so it equals the hash of the written
    file's data); the legacy hash is the first 8 hex digits of the sha256 of bytes ``[0x100000, 0x110000)``.
    """
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def kohya_metadata(
    tensors: dict[str, Tensor],
    lora: Mapping[str, ModuleChange],
    params: FluxParams,
    *,
    output_name: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Header of a kohya-layout file holding ``tensors`` (the file's exact tensors, for the hashes).

    ``extra`` entries are added last and win over the defaults (except the hashes, which are computed last).
    """
    extra = check_metadata(extra)
    if "lora_adapter_metadata" in extra:
        raise ValueError(
            "'lora_adapter_metadata' must not be written into a kohya-layout file: diffusers would "
            "build its LoraConfig from it and apply alpha/rank twice"
        )
    meta = {
        "format": "pt",
        "ss_v2": "False",
        "ss_base_model_version": "flux1",
        "ss_model_type": "flux",
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": _uniform({rank_of(w) for w in lora.values()}, str),
        "ss_network_alpha": _uniform(
            {alpha_of(w) for w in lora.values()}, lambda a: str(None if a is None else float(a))
        ),
        "ss_network_args": "{}",
        **network_metadata(lora),
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture(params),
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": output_name,
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        PARAMS_METADATA_KEY: json.dumps(params.to_dict()),
        LAYOUT_METADATA_KEY: "kohya",
    }
    meta.update(extra)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(tensors, meta)
    return meta


def diffusers_metadata(params: FluxParams, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Header of a diffusers-layout file: ``format=pt`` and our own keys (no LoraConfig: ranks are shapes)."""
    return {
        "format": "pt",
        PARAMS_METADATA_KEY: json.dumps(params.to_dict()),
        LAYOUT_METADATA_KEY: "diffusers",
        **check_metadata(extra),
    }


def warn_kohya_non_block(lora: Mapping[str, ModuleChange], path: Path) -> None:
    """Warn when a kohya-layout file holds modules outside the blocks: other tools drop or refuse them.

    ComfyUI, Forge and our reader apply them. diffusers drops embedder and final-layer modules of kohya files
    without a warning; kohya sd-scripts' network loader (strict) refuses ``lora_unet_final_layer_*`` as
    unexpected keys, and its merge script leaves them out without a word.
    """
    outside = sorted(n for n in lora if not n.startswith(_BLOCK_PREFIXES))
    if outside:
        final = [n for n in outside if n.startswith("final_layer.")]
        kohya = (
            f"kohya sd-scripts' LoRA loader refuses {', '.join(final)} (unexpected keys) and its merge skips them; "
            if final
            else ""
        )
        log.warning(
            "%s: %d modules outside the double/single blocks (%s) load in ComfyUI and Forge, but diffusers drops "
            "them from kohya files without a warning; %salso write layout='diffusers' for diffusers users",
            path,
            len(outside),
            ", ".join(outside),
            kohya,
        )


def peft_alpha_rule(metadata: dict[str, str] | None, source: str) -> Callable[[str, int], float] | None:
    """``(module, rank) -> alpha`` from a peft LoraConfig in ``lora_adapter_metadata`` (diffusers' way)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError) as e:
        raise LoraFormatError(f"{source}: metadata 'lora_adapter_metadata' is not a JSON object ({e})") from None
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    lora_alpha = float(cfg.get("lora_alpha", 8))  # peft's LoraConfig default, which diffusers would use
    patterns = dict(cfg.get("alpha_pattern") or {})
    rslora = bool(cfg.get("use_rslora", False))

    def alpha(module: str, rank: int) -> float:
        # peft's pattern rule: the first key that matches a dotted suffix of the module name
        key = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)
        a = float(patterns[key]) if key is not None else lora_alpha
        return a * math.sqrt(rank) if rslora else a  # rsLoRA scales by alpha / sqrt(r)

    return alpha
