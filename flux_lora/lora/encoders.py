"""Text-encoder parts of LoRA files (CLIP-L and T5), read for :class:`~flux_lora.model.text_encoders.TextEncoders`.

Key families, with the base name of CLIP's first q projection / T5's first q (then the usual suffixes, or those
of :mod:`flux_lora.lora.patches`):

- kohya: ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj`` (CLIP-L) and
  ``lora_te3_encoder_block_0_layer_0_SelfAttention_q`` (T5; ``lora_te2_`` too, as some tools write it)
- diffusers: ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` and
  ``text_encoder_2.encoder.block.0.layer.0.SelfAttention.q``
- ComfyUI: ``text_encoders.clip_l.transformer.text_model...`` and ``text_encoders.t5xxl.transformer.encoder...``

The result is keyed by module path inside ``TextEncoders`` (``clip.<path>``, ``t5.<path>``), so
``apply_loras(pipe.text_encoders, [(te_lora, scale, name)])`` applies it. ``text_model.`` is optional in CLIP
paths: transformers 5's ``CLIPTextModel`` has no such level.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from pathlib import Path

from torch import Tensor, nn

from flux_lora.lora.keys import PLAIN_ROLES, LoraFormatError, alpha_value, non_finite, split_suffix, unapplied_message
from flux_lora.lora.patches import ModuleChange, Patch, bias_change, check_patch, weight_change
from flux_lora.lora.weight import LoraWeight
from flux_lora.weights.safetensors_io import iter_tensors

log = logging.getLogger(__name__)

_PREFIXES = {
    "clip": (("lora_te1_", "_"), ("text_encoder.", "."), ("text_encoders.clip_l.transformer.", ".")),
    "t5": (
        ("lora_te3_", "_"),
        ("lora_te2_", "_"),
        ("text_encoder_2.", "."),
        ("text_encoders.t5xxl.transformer.", "."),
    ),
}
TEXT_ENCODER_PREFIXES = tuple(prefix for table in _PREFIXES.values() for prefix, _ in table)


def is_text_encoder_key(key: str) -> bool:
    return key.startswith(TEXT_ENCODER_PREFIXES)


def _linears(encoders: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in encoders.named_modules() if isinstance(m, nn.Linear)}


@functools.lru_cache(maxsize=4)
def _table_for(names: tuple[str, ...]) -> dict[str, str]:
    table = {}
    for path in names:
        part, _, inner = path.partition(".")
        variants = [inner] if part != "clip" or inner.startswith("text_model.") else [inner, f"text_model.{inner}"]
        for prefix, sep in _PREFIXES.get(part, ()):
            for v in variants:
                table[prefix + v.replace(".", sep)] = path
    return table


def base_name_table(encoders: nn.Module) -> dict[str, str]:
    """Every text-encoder base name of every family -> module path in ``encoders`` (``clip.*`` / ``t5.*``)."""
    return _table_for(tuple(sorted(_linears(encoders))))


def from_state_dict(
    sd: dict[str, Tensor], encoders: nn.Module, *, source: str = "LoRA", allow_partial: bool = False
) -> dict[str, ModuleChange]:
    """The text-encoder keys of ``sd`` (others are ignored: they are the DiT's) as changes of ``encoders``."""
    sd = {k: v for k, v in sd.items() if is_text_encoder_key(k)}
    if (bad := non_finite(sd)) is not None:
        raise LoraFormatError(f"{source}: {bad}")
    table = base_name_table(encoders)
    groups: dict[str, dict[str, tuple[str, Tensor]]] = defaultdict(dict)
    unmatched = []
    for key, t in sd.items():
        parsed = split_suffix(key)
        if parsed is None or parsed[0] not in table:
            unmatched.append(key)
        else:
            groups[parsed[0]][parsed[1]] = (key, t)
    linears, out, errors = _linears(encoders), {}, []
    for base, roles in groups.items():
        path = table[base]
        change, err = _change(roles, linears[path], source)
        if err is not None:
            errors.append(f"{base!r}: {err}")
        elif change is not None:
            out[path] = change
        else:
            unmatched += [k for k, _ in roles.values()]
    if errors:
        raise LoraFormatError(f"{source}: {len(errors)} text-encoder modules do not fit: {'; '.join(errors[:5])}")
    if unmatched and not allow_partial:
        raise LoraFormatError(unapplied_message(source, unmatched))
    if unmatched:
        log.warning("%s: %d text-encoder keys are ignored (allow_partial): %s", source, len(unmatched), unmatched)
    return out


def _change(
    roles: dict[str, tuple[str, Tensor]], layer: nn.Linear, source: str
) -> tuple[ModuleChange | None, str | None]:
    alpha = alpha_value(*roles["alpha"], source) if "alpha" in roles else None
    if set(roles) <= PLAIN_ROLES and not ("down" in roles and "up" in roles):
        return None, None  # a stray alpha or half a pair: unmatched
    try:
        weight = weight_change(roles, alpha, alpha)
    except ValueError as e:
        return None, str(e)
    p = Patch(0, layer.out_features, weight, bias_change(roles, weight), roles.get("dora_scale", (None, None))[1])
    if (err := check_patch(p, layer.in_features)) is not None:
        return None, err
    if p.bias is not None and layer.bias is None:
        return None, "changes a bias the layer does not have"
    if isinstance(weight, LoraWeight) and set(roles) <= PLAIN_ROLES:
        return weight, None
    return (p,), None


def read_text_encoder_lora(
    source: str | Path | dict[str, Tensor], encoders: nn.Module, *, allow_partial: bool = False
) -> dict[str, ModuleChange]:
    """The text-encoder part of a LoRA file (or state dict) for ``encoders``; empty when it has none."""
    if isinstance(source, dict):
        return from_state_dict(source, encoders, allow_partial=allow_partial)
    sd = dict(iter_tensors(Path(source), skip=lambda k: not is_text_encoder_key(k)))
    return from_state_dict(sd, encoders, source=str(source), allow_partial=allow_partial)
