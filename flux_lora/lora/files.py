"""LoRA weights in one canonical form, and the file layouts other tools use.

Canonical form: ``dict[str, LoraWeight]`` keyed by the BFL module path of a Linear in
:class:`flux_lora.model.flux.Flux` (``double_blocks.0.img_attn.qkv``, ``single_blocks.3.linear1``, ...), fused
layouts kept fused. The update of a module is ``delta_W = (alpha / rank) * up @ down``.

Reading (:func:`read_lora`, :func:`from_state_dict`) accepts every layout listed in :mod:`flux_lora.lora.keys`
(kohya, ComfyUI, diffusers/peft, XLabs, raw peft, OneTrainer, LyCORIS, DiffSynth) and folds split q/k/v(/mlp)
LoRAs back into the fused Linear exactly. Writing (:func:`write_lora`) produces the kohya layout (the most
widely loadable: ComfyUI, Forge, kohya, diffusers, ours) or the diffusers layout (``transformer.*`` split, for
diffusers users and for LoRAs on the embedders / final layer, which diffusers drops from kohya files).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from flux_lora.atomic import save_safetensors_atomic
from flux_lora.lora.encoders import is_text_encoder_key
from flux_lora.lora.keys import (
    PLAIN_ROLES,
    LoraFormatError,
    Roles,
    Target,
    alpha_value,
    base_name_table,
    detect_layout,
    input_width,
    kohya_name,
    linear_shapes,
    non_finite,
    norm_override_path,
    norm_scale_shapes,
    pair_error,
    split_suffix,
    unapplied_message,
)
from flux_lora.lora.lycoris import kind_of, kohya_tensors
from flux_lora.lora.metadata import diffusers_metadata, kohya_metadata, peft_alpha_rule, warn_kohya_non_block
from flux_lora.lora.patches import (
    Change,
    DoraNorm,
    ModuleChange,
    NormOverride,
    Patch,
    WeightChange,
    bias_change,
    check_dora_norm,
    check_patch,
    weight_change,
)
from flux_lora.lora.weight import LoraStateDict, LoraWeight, fuse_row_blocks, split_row_blocks
from flux_lora.model.flux import FluxParams
from flux_lora.weights.keymaps import flux_linear_maps
from flux_lora.weights.safetensors_io import iter_tensors, read_metadata

log = logging.getLogger(__name__)

# Layouts whose alpha, when the file has no ``.alpha`` keys, comes from a peft config (lora_adapter_metadata).
_PEFT_FAMILY = ("diffusers", "peft", "diffsynth")
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


# ----------------------------------------------------------------------------------------- checks


def check_lora(lora: Mapping[str, ModuleChange], params: FluxParams, source: str = "LoRA", kinds: bool = False) -> None:
    """Raise :class:`LoraFormatError` unless every module exists in the model and every shape fits; ``kinds``
    also admits DoRA, LoHa and LoKr modules (:func:`flux_lora.lora.lycoris.kind_of`)."""
    shapes = linear_shapes(params)
    bad = []
    for name, w in lora.items():
        if name not in shapes:
            bad.append(f"{name!r} is not a Linear of the model")
            continue
        if not isinstance(w, LoraWeight):
            if not kinds or kind_of(w) == "other":
                bad.append(f"{name!r} holds {'+'.join(_kinds(w))}, which is not a plain LoRA")
            elif (shape := w[0].weight_shape()) != shapes[name]:
                bad.append(f"{name!r}: {'+'.join(_kinds(w))} of shape {shape}; the layer is {shapes[name]}")
            continue
        out_f, in_f = shapes[name]
        if (
            w.down.ndim != 2
            or w.up.ndim != 2
            or w.down.shape[0] != w.up.shape[1]
            or w.down.shape[1] != in_f
            or w.up.shape[0] != out_f
        ):
            bad.append(
                f"{name!r}: down {tuple(w.down.shape)}, up {tuple(w.up.shape)}; expected down [r, {in_f}], "
                f"up [{out_f}, r]"
            )
        elif not math.isfinite(float(w.alpha)):
            bad.append(f"{name!r}: alpha {w.alpha}")
    if bad:
        raise LoraFormatError(f"{source} does not fit the model ({len(bad)} modules): {'; '.join(bad[:5])}")


# ------------------------------------------------------------------------------------- writing state dicts


def _alpha_tensor(alpha: float) -> Tensor:
    return torch.tensor(float(alpha), dtype=torch.float32)


def to_kohya_state_dict(lora: Mapping[str, ModuleChange], params: FluxParams) -> dict[str, Tensor]:
    """Canonical LoRA -> kohya keys ``lora_unet_<bfl_path>.{lora_down.weight, lora_up.weight, alpha}``; DoRA,
    LoHa and LoKr modules get LyCORIS' keys (:mod:`flux_lora.lora.lycoris`)."""
    check_lora(lora, params, kinds=True)
    sd: dict[str, Tensor] = {}
    for name, w in lora.items():
        sd.update(kohya_tensors(kohya_name(name), w))
    return sd


def to_diffusers_state_dict(lora: LoraStateDict, params: FluxParams, bake_scale: bool = True) -> dict[str, Tensor]:
    """Canonical LoRA -> diffusers keys ``transformer.<diffusers module>.lora_A/.lora_B.weight``.

    Fused q/k/v(/mlp) are split by rows (:func:`split_row_blocks`); ``norm_out.linear`` gets its up rows
    swapped. ``bake_scale``: multiply alpha/r into lora_B (loads at scale 1 everywhere); otherwise write float
    ``.alpha`` keys.
    """
    check_lora(lora, params)
    maps = {m.bfl: m for m in flux_linear_maps(params)}
    parts: dict[str, LoraWeight] = {}
    for name, w in lora.items():
        m = maps[name]
        if m.is_split:
            split = split_row_blocks(w, m.sizes)
        else:
            split = [LoraWeight(w.down, m.to_diffusers_rows(w.up)[0], w.alpha)]
        parts.update((module, part) for module, part in zip(m.diffusers, split, strict=True) if part is not None)
    if not bake_scale:
        _align_suffix_alphas(parts)
    sd: dict[str, Tensor] = {}
    for module, part in parts.items():
        base = f"transformer.{module}"
        sd[f"{base}.lora_A.weight"] = part.down
        sd[f"{base}.lora_B.weight"] = _scaled(part.up, part.scale) if bake_scale else part.up
        if not bake_scale:
            sd[f"{base}.alpha"] = _alpha_tensor(part.alpha)
    return sd


def _scaled(up: Tensor, scale: float) -> Tensor:
    return up if scale == 1.0 else (up.float() * scale).to(up.dtype)


def _align_suffix_alphas(parts: dict[str, LoraWeight]) -> None:
    """Give modules whose name ends with another module's name that module's alpha, rescaling their up.

    diffusers turns per-module alphas into peft ``alpha_pattern`` keys, which match any module whose name ends
    with the key: the alpha of ``proj_out`` (final layer) would also apply to
    ``single_transformer_blocks.N.proj_out``.
    """
    for short, w in list(parts.items()):
        if w.alpha == 0:
            continue
        for name, other in parts.items():
            if name.endswith("." + short) and other.alpha != w.alpha:
                parts[name] = LoraWeight(other.down, _scaled(other.up, other.alpha / w.alpha), w.alpha)


# ------------------------------------------------------------------------------------- reading state dicts


def _group_keys(sd: dict[str, Tensor], table: dict[str, Target], source: str) -> tuple[dict[str, Roles], list[str]]:
    groups: dict[str, dict[str, tuple[str, Tensor]]] = defaultdict(dict)
    unmatched = []
    for key, tensor in sd.items():
        parsed = split_suffix(key)
        if parsed is None or parsed[0] not in table:
            unmatched.append(key)
            continue
        base, role = parsed
        if role in groups[base]:
            raise LoraFormatError(f"{source}: {groups[base][role][0]!r} and {key!r} are the same LoRA tensor")
        groups[base][role] = (key, tensor)
    return groups, unmatched


Block = tuple[int, int, "LoraWeight | Patch", str]
"""``(first row, rows, LoRA or patch, base name)``: what one base name of a file holds for one Linear."""


def _collect_blocks(
    sd: dict[str, Tensor],
    params: FluxParams,
    metadata: dict[str, str] | None,
    source: str,
    dora_norm: DoraNorm = "peft",
) -> tuple[dict[str, list[Block]], list[str]]:
    """``bfl -> blocks`` for every complete LoRA pair or patch; keys matching nothing."""
    table = base_name_table(params)
    peft_alpha = peft_alpha_rule(metadata, source)
    groups, unmatched = _group_keys(sd, table, source)
    blocks: dict[str, list[Block]] = defaultdict(list)
    errors = []
    item: LoraWeight | Patch
    for base, roles in groups.items():
        t = table[base]
        alpha = alpha_value(*roles["alpha"], source) if "alpha" in roles else None
        if alpha is None and peft_alpha is not None and t.layout in _PEFT_FAMILY and "down" in roles:
            alpha = peft_alpha(t.module, roles["down"][1].shape[0])
        in_f = input_width(t.bfl, roles.get("down", (None, None))[1], params)
        if set(roles) <= PLAIN_ROLES:
            if "down" not in roles or "up" not in roles:
                unmatched += [key for key, _ in roles.values()]
                continue
            item, err = _plain(t, roles, alpha, in_f, params)
        else:
            item, err = _patch(t, roles, alpha, in_f, params, dora_norm)
        if err is not None:
            errors.append(f"{' / '.join(repr(k) for k, _ in roles.values())}: {err}")
            continue
        blocks[t.bfl].append((t.start, t.rows, item, base))
    if errors:
        raise LoraFormatError(
            f"{source}: {len(errors)} LoRA modules do not fit the model "
            f"(hidden {params.hidden_size}): {'; '.join(errors[:5])}"
        )
    return blocks, unmatched


def _plain(
    t: Target, roles: Roles, alpha: float | None, in_f: int, params: FluxParams
) -> tuple[LoraWeight, str | None]:
    (_, down), (_, up) = roles["down"], roles["up"]
    if (err := pair_error(t, down, up, in_f)) is not None:
        return None, err  # type: ignore[return-value]
    if t.swap_halves:
        up = _swap(t, up, params)
    return LoraWeight(down, up, float(down.shape[0]) if alpha is None else alpha), None


def _swap(t: Target, rows: Tensor, params: FluxParams) -> Tensor:
    return {m.bfl: m for m in flux_linear_maps(params)}[t.bfl].to_bfl_rows([rows])


def _patch(
    t: Target, roles: Roles, alpha: float | None, in_f: int, params: FluxParams, dora_norm: DoraNorm = "peft"
) -> tuple[Patch, str | None]:
    """A LoHa / LoKr / diff / bias / DoRA patch (any LoRA pair among the keys included)."""
    try:
        weight = weight_change(roles, alpha, alpha)
    except ValueError as e:
        return None, str(e)  # type: ignore[return-value]
    if "diff_b" in roles and "bias" in roles:
        return None, "both diff_b and lora_B.bias"  # type: ignore[return-value]
    bias = bias_change(roles, weight)  # peft's lora_B.bias times alpha / r
    p = Patch(t.start, t.rows, weight, bias, roles.get("dora_scale", (None, None))[1], dora_norm)
    if (err := check_patch(p, in_f)) is not None:
        return p, err
    return (_swap_patch(t, p, params), None) if t.swap_halves else (p, None)


def _swap_patch(t: Target, p: Patch, params: FluxParams) -> Patch:
    """``p`` with its rows in BFL order (the diffusers ``norm_out.linear`` holds them swapped): a LoRA's up rows, a
    dense change, the bias and a per-row DoRA magnitude are swapped; column norms do not depend on row order."""
    w, m = p.weight, p.dora_scale
    if isinstance(w, LoraWeight):
        weight: WeightChange | None = LoraWeight(w.down, _swap(t, w.up, params), w.alpha)
    else:
        weight = None if w is None else _swap(t, w if isinstance(w, Tensor) else w.delta(), params)
    if m is not None and m.numel() == p.rows and not (m.ndim == 2 and m.shape[0] == 1):
        m = _swap(t, m.reshape(-1), params).reshape(m.shape)
    bias = None if p.bias is None else _swap(t, p.bias.reshape(-1), params)
    return Patch(p.start, p.rows, weight, bias, m, p.dora_norm)


def _check_overlap(bfl: str, blocks: list[Block], source: str) -> None:
    end, prev = 0, None
    for start, rows, _, base in sorted(blocks, key=lambda b: b[0]):
        if prev is not None and start < end:
            raise LoraFormatError(f"{source}: {prev!r} and {base!r} both hold a LoRA for rows of {bfl}")
        end, prev = start + rows, base


def _norm_overrides(
    sd: dict[str, Tensor], params: FluxParams, source: str
) -> tuple[dict[str, NormOverride], dict[str, Tensor]]:
    """``(RMSNorm scale path -> override, the other keys)``; a scale of the wrong shape is an error naming it."""
    shapes = norm_scale_shapes(params)
    overrides, rest, bad = {}, {}, []
    for key, t in sd.items():
        path = norm_override_path(key, params)
        if path is None:
            rest[key] = t
        elif tuple(t.shape) != shapes[path]:
            bad.append(f"{key!r} has shape {tuple(t.shape)}, the model's {path} {shapes[path]}")
        elif path in overrides:
            raise LoraFormatError(f"{source}: two keys override {path}")
        else:
            overrides[path] = NormOverride(t)
    if bad:
        raise LoraFormatError(f"{source}: {len(bad)} norm overrides do not fit the model: {'; '.join(bad[:5])}")
    return overrides, rest


def _module_change(parts: list[Block], out_features: int) -> ModuleChange:
    """One Linear's blocks -> a fused plain LoRA, or patches (plain LoRA blocks among them as patches)."""
    if all(isinstance(item, LoraWeight) for _, _, item, _ in parts):
        return fuse_row_blocks([(start, item) for start, _, item, _ in parts], out_features)  # type: ignore[misc]
    return tuple(
        item if isinstance(item, Patch) else Patch(start, rows, item)
        for start, rows, item, _ in sorted(parts, key=lambda b: b[0])
    )


def from_state_dict(
    sd: dict[str, Tensor],
    params: FluxParams,
    *,
    metadata: dict[str, str] | None = None,
    source: str = "LoRA state dict",
    allow_partial: bool = False,
    skip_text_encoders: bool = False,
    dora_norm: DoraNorm = "peft",
) -> LoraStateDict:
    """Any supported LoRA layout -> canonical fused LoRA with explicit alpha. Pure (no file access).

    Args:
        sd: the file's tensors. A key that is not applied (DoRA ``dora_scale``, LyCORIS LoHa/LoKr, ``.diff``,
            biases, text-encoder parts, modules the model lacks) is an error listing the keys, unless
            ``allow_partial``: then they are listed in one warning and the rest is applied.
        params: the model the LoRA is for; every down/up shape must fit it.
        metadata: safetensors header; ``lora_adapter_metadata`` (a peft LoraConfig as JSON, keys optionally
            prefixed ``transformer.``) gives alpha to diffusers / peft keys that have no ``.alpha``.
        source: how errors and warnings name the input.
        skip_text_encoders: leave text-encoder keys out (read them with
            :func:`flux_lora.lora.encoders.read_text_encoder_lora`) instead of counting them as unappliable; a
            file with only text-encoder keys then gives ``{}``.
        dora_norm: the norm an ``[out, 1]`` DoRA magnitude divides by: ``"peft"`` (``||W + dW||``, as peft and
            LyCORIS, which train such files) or ``"comfyui"`` (``||W||``, as ComfyUI's ``weight_decompose``);
            see :mod:`flux_lora.lora.patches`.

    Raises:
        LoraFormatError: nothing matches, a key is not applied (without ``allow_partial``), a tensor holds NaN
            or Inf, a shape does not fit, or two keys cover the same rows.
    """
    check_dora_norm(dora_norm)
    if (bad := non_finite(sd)) is not None:
        raise LoraFormatError(f"{source}: {bad}; the file is damaged or was saved from a diverged run")
    if skip_text_encoders:
        sd = {k: v for k, v in sd.items() if not is_text_encoder_key(k)}
        if not sd:
            return {}
    overrides, sd = _norm_overrides(sd, params, source)
    blocks, unmatched = _collect_blocks(sd, params, metadata, source, dora_norm)
    if not blocks and not overrides:
        raise LoraFormatError(
            f"{source}: no key matches a FLUX LoRA layout for this model (layout guess: "
            f"{detect_layout(sd)}); first keys: {sorted(sd)[:5]}"
        )
    if unmatched and not allow_partial:
        raise LoraFormatError(unapplied_message(source, unmatched))
    if unmatched:
        log.warning(
            "%s: %d keys match no module of the model and are ignored (allow_partial): %s",
            source,
            len(unmatched),
            sorted(unmatched),
        )
    shapes = linear_shapes(params)
    lora: dict[str, Change] = dict(overrides)
    for bfl, parts in blocks.items():
        _check_overlap(bfl, parts, source)
        lora[bfl] = _module_change(parts, shapes[bfl][0])
    return lora  # type: ignore[return-value]


def _from_layout(
    sd: dict[str, Tensor], params: FluxParams, layouts: tuple[str, ...], metadata: dict[str, str] | None
) -> LoraStateDict:  # our own layouts: every key must apply
    found = detect_layout(sd)
    if found not in layouts:
        raise LoraFormatError(
            f"expected a {' or '.join(layouts)} LoRA state dict, got {found} (first keys: {sorted(sd)[:3]})"
        )
    return from_state_dict(sd, params, metadata=metadata)


def from_kohya_state_dict(sd: dict[str, Tensor], params: FluxParams) -> LoraStateDict:
    """Inverse of :func:`to_kohya_state_dict` (``lora_unet_*`` keys)."""
    return _from_layout(sd, params, ("kohya",), None)


def from_diffusers_state_dict(
    sd: dict[str, Tensor], params: FluxParams, metadata: dict[str, str] | None = None
) -> LoraStateDict:
    """Inverse of :func:`to_diffusers_state_dict` (``transformer.*`` keys; split parts fused back exactly)."""
    return _from_layout(sd, params, ("diffusers",), metadata)


# ----------------------------------------------------------------------------------------- files


def read_lora(
    source: str | Path | dict[str, Tensor],
    params: FluxParams,
    *,
    metadata: dict[str, str] | None = None,
    allow_partial: bool = False,
    plain: bool = False,
    skip_text_encoders: bool = False,
    dora_norm: DoraNorm = "peft",
) -> LoraStateDict:
    """Read a LoRA in any supported layout from a safetensors file (or a state dict) for a ``params`` model.

    ``metadata`` is merged over the file's own safetensors metadata; ``allow_partial`` applies what can be
    applied when some keys cannot (see :func:`from_state_dict`). Modules with DoRA, LoHa, LoKr, diff or bias
    keys come back as a tuple of :class:`~flux_lora.lora.patches.Patch` (``apply_loras`` applies them);
    ``plain=True`` makes them an error, for uses that need a plain LoRA (training from it, writing it).
    ``skip_text_encoders``, ``dora_norm`` (``"peft"`` or ``"comfyui"``): see :func:`from_state_dict`.
    """
    if isinstance(source, dict):
        lora = from_state_dict(
            source,
            params,
            metadata=metadata,
            allow_partial=allow_partial,
            skip_text_encoders=skip_text_encoders,
            dora_norm=dora_norm,
        )
        return check_plain(lora, "LoRA state dict") if plain else lora
    path = Path(source)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path}: only safetensors LoRA files are read (pickle files can run code); "
            "convert it to .safetensors first"
        )
    file_metadata = read_metadata(path)
    sd = dict(iter_tensors(path))
    merged = {**file_metadata, **(metadata or {})}
    lora = from_state_dict(
        sd,
        params,
        metadata=merged,
        source=str(path),
        allow_partial=allow_partial,
        skip_text_encoders=skip_text_encoders,
        dora_norm=dora_norm,
    )
    log.info("%s: %s layout, %d modules", path, detect_layout(sd), len(lora))
    return check_plain(lora, str(path)) if plain else lora


def check_plain(lora: LoraStateDict, source: str) -> LoraStateDict:
    """``lora`` if every module is a plain LoRA; else a :class:`LoraFormatError` naming the other kinds."""
    other = {name: _kinds(w) for name, w in lora.items() if not isinstance(w, LoraWeight)}
    if other:
        first = ", ".join(f"{n} ({'+'.join(k)})" for n, k in list(other.items())[:5])
        raise LoraFormatError(f"{source}: {len(other)} modules are not a plain LoRA, which is needed here: {first}")
    return lora


def _kinds(change: Change) -> list[str]:
    if isinstance(change, NormOverride):
        return list(change.kinds)
    return sorted({k for p in change for k in p.kinds})  # type: ignore[union-attr]


def write_lora(
    path: str | Path,
    lora: Mapping[str, ModuleChange],
    params: FluxParams,
    *,
    layout: str = "kohya",
    metadata: dict[str, str] | None = None,
    bake_scale: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``lora`` as a safetensors file (atomically) in the ``kohya`` or ``diffusers`` layout.

    ``dtype`` (e.g. bfloat16, half the bytes of float32) stores the up/down matrices in it; ``.alpha`` stays float32.
    DoRA, LoHa and LoKr modules (as :func:`flux_lora.lora.peft_adapters.adapter_state_dict` gives them) are
    written in the kohya layout only, with LyCORIS' keys and metadata; the diffusers layout refuses them.

    kohya: fused modules, float32 ``.alpha``, ``format``/``ss_*``/``modelspec.*``/``sshs_*`` metadata (see
    :mod:`flux_lora.lora.metadata`). diffusers: split ``transformer.*`` modules, scale baked into lora_B
    unless ``bake_scale=False`` (then float ``.alpha`` keys). ``metadata`` adds (or overrides) header entries;
    values must be strings.
    """
    path = Path(path)
    other = next((n for n, w in lora.items() if not isinstance(w, LoraWeight)), None)
    if layout == "diffusers" and other is not None:
        raise LoraFormatError(
            f"{path}: the diffusers layout holds plain LoRAs only; {other!r} is "
            f"{'+'.join(_kinds(lora[other]))} (write layout='kohya', which ComfyUI and Forge apply)"
        )
    if layout == "kohya":
        warn_kohya_non_block(lora, path)
        sd = to_kohya_state_dict(lora, params)
    elif layout == "diffusers":
        sd = to_diffusers_state_dict(cast(LoraStateDict, lora), params, bake_scale)
    else:
        raise ValueError(f"layout must be 'kohya' or 'diffusers', got {layout!r}")
    # Our own copies: split parts share storage, which safetensors refuses to write.
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    if dtype is not None:
        sd = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in sd.items()}
    if layout == "kohya":
        header = kohya_metadata(sd, lora, params, output_name=path.stem, extra=metadata)
    else:
        header = diffusers_metadata(params, extra=metadata)
    return save_safetensors_atomic(sd, path, header)
