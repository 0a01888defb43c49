"""Key tables of the FLUX LoRA file layouts, derived from :class:`FluxParams` and ``flux_linear_maps``.

A LoRA file names each adapted module by a *base name* followed by a suffix (``.lora_down.weight``,
``.lora_A.weight``, ``.alpha``, ...). Every base name a common tool writes for FLUX resolves here to a
:class:`Target`: a block of output rows of one fused BFL Linear. Fused layouts cover the whole Linear; split
layouts (diffusers and its relatives) cover one of q / k / v / proj_mlp; the diffusers ``norm_out.linear``
holds the final adaLN rows with its two halves swapped.

The layouts, with the base name of ``double_blocks.0.img_attn.qkv`` (down ``[r, in]``, up ``[out, r]``):

- kohya: ``lora_unet_double_blocks_0_img_attn_qkv`` + ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``
- comfyui: ``diffusion_model.double_blocks.0.img_attn.qkv`` + down/up or ``.lora_A``/``.lora_B``, opt. alpha
- diffusers: ``transformer.transformer_blocks.0.attn.to_q`` (and ``to_k``, ``to_v``) + ``.lora_A``/``B``,
  optional ``.alpha`` (or a peft config in the ``lora_adapter_metadata`` header)
- xlabs: ``double_blocks.0.processor.qkv_lora1`` (optionally ``diffusion_model.``) + ``.down``/``.up.weight``
- peft: ``base_model.model.double_blocks.0.img_attn.qkv`` or the bare BFL path + ``.lora_A``/``.lora_B``
- onetrainer: ``lora_transformer_transformer_blocks_0_attn_to_q`` + kohya suffixes
- lycoris: ``lycoris_transformer_blocks_0_attn_to_q`` + kohya suffixes
- diffsynth: the bare diffusers path ``transformer_blocks.0.attn.to_q`` + ``.lora_A``/``.lora_B``

XLabs' single-block ``qkv_lora`` and ComfyUI's ``single_blocks.N.linear1_qkv`` cover only the q, k, v rows of
``linear1``.

Any base name may also carry, instead of or with a down/up pair, the suffixes of :mod:`flux_lora.lora.patches`:
``.dora_scale`` (peft / diffusers: ``.lora_magnitude_vector``), LyCORIS ``.hada_w{1,2}_{a,b}`` and
``.lokr_w{1,2}[_a|_b]``, ``.diff``, ``.diff_b``, ``.lora_B.bias`` / ``.lora_up.bias``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor, nn

from flux_lora.model.flux import Flux, FluxParams
from flux_lora.weights.keymaps import flux_linear_maps
from flux_lora.weights.safetensors_io import CheckpointError

LAYOUTS = ("kohya", "comfyui", "diffusers", "xlabs", "peft", "onetrainer", "lycoris", "diffsynth")

# Suffix -> role; longest first, so ``.lora_down.weight`` never reads as ``.down.weight``.
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"),
    (".lora_up.bias", "bias"),
    (".down.weight", "down"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
"""File suffix -> role. ``down``/``up``/``alpha``: a plain LoRA; the others: :mod:`flux_lora.lora.patches`."""
PLAIN_ROLES = frozenset({"down", "up", "alpha"})

_BFL_TOP = (
    "double_blocks.",
    "single_blocks.",
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
)
_DIFFUSERS_TOP = (
    "transformer_blocks.",
    "single_transformer_blocks.",
    "x_embedder.",
    "context_embedder.",
    "time_text_embed.",
    "proj_out.",
    "norm_out.",
)


class LoraFormatError(CheckpointError):
    """A LoRA file or state dict that does not fit the model; the message names the source and the keys."""


@dataclass(frozen=True)
class Target:
    """Where a base name's LoRA lands: rows ``[start, start + rows)`` of the BFL Linear ``bfl``.

    ``swap_halves``: the file's up rows are in diffusers' [scale; shift] order (final adaLN).
    ``module``: the module path as the writing tool named it (what peft's alpha/rank patterns match against).
    """

    bfl: str
    start: int
    rows: int
    layout: str
    module: str
    swap_halves: bool = False


@functools.lru_cache(maxsize=8)
def linear_shapes(params: FluxParams) -> dict[str, tuple[int, int]]:
    """``BFL Linear name -> (out_features, in_features)`` of the DiT, read off a model on the meta device.

    The returned dict is shared (cached); do not modify it.
    """
    with torch.device("meta"):
        model = Flux(params)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@functools.lru_cache(maxsize=8)
def norm_scale_shapes(params: FluxParams) -> dict[str, tuple[int, ...]]:
    """``RMSNorm scale path -> shape`` of the DiT (``double_blocks.0.img_attn.norm.query_norm.scale``, ...):
    what a BFL control LoRA overrides. Shared (cached); do not modify it."""
    with torch.device("meta"):
        model = Flux(params)
    norms = ("query_norm.scale", "key_norm.scale")
    return {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith(norms)}


def norm_override_path(key: str, params: FluxParams) -> str | None:
    """The RMSNorm scale a file key overrides (bare BFL name or ``diffusion_model.`` prefixed), or None."""
    path = key.removeprefix("diffusion_model.")
    return path if path in norm_scale_shapes(params) else None


WIDENED_INPUT = "img_in"
"""The Linear a control LoRA may widen: its input takes image and structure latents side by side."""


def input_width(bfl: str, down: Tensor | None, params: FluxParams) -> int:
    """The input width a LoRA for ``bfl`` may have: the layer's, or twice ``in_channels`` for a control LoRA's
    widened ``img_in`` (image + structure latents, 128 for FLUX.1)."""
    width = linear_shapes(params)[bfl][1]
    if bfl == WIDENED_INPUT and down is not None and down.ndim == 2 and down.shape[1] == 2 * params.in_channels:
        return 2 * params.in_channels
    return width


def kohya_name(bfl: str) -> str:
    """``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return "lora_unet_" + bfl.replace(".", "_")


@functools.lru_cache(maxsize=8)
def base_name_table(params: FluxParams) -> dict[str, Target]:
    """Every base name of every layout for a model of ``params`` -> :class:`Target`.

    The returned dict is shared (cached); do not modify it.
    """
    table: dict[str, Target] = {}

    def add(name: str, target: Target) -> None:
        if name in table:
            raise AssertionError(f"base name {name!r} is ambiguous ({table[name]} vs {target})")
        table[name] = target

    shapes = linear_shapes(params)
    for m in flux_linear_maps(params):
        out = shapes[m.bfl][0]
        for name, layout in (
            (kohya_name(m.bfl), "kohya"),
            (f"diffusion_model.{m.bfl}", "comfyui"),
            (f"base_model.model.{m.bfl}", "peft"),
            (m.bfl, "peft"),
        ):
            add(name, Target(m.bfl, 0, out, layout, m.bfl))
        sizes = m.sizes if m.is_split else (out,)
        for start, rows, name in zip(accumulate(sizes, initial=0), sizes, m.diffusers, strict=False):
            under = name.replace(".", "_")
            for base, layout in (
                (f"transformer.{name}", "diffusers"),
                (name, "diffsynth"),
                (f"lora_transformer_{under}", "onetrainer"),
                (f"lycoris_{under}", "lycoris"),
            ):
                add(base, Target(m.bfl, start, rows, layout, name, m.swap_halves))
    _add_xlabs(params, shapes, add)
    return table


def _add_xlabs(params: FluxParams, shapes: dict[str, tuple[int, int]], add: Callable[[str, Target], None]) -> None:
    qkv_rows = 3 * params.hidden_size  # q, k, v rows at the top of linear1
    for i in range(params.depth):
        b = f"double_blocks.{i}"
        for proc, module in (
            ("qkv_lora1", "img_attn.qkv"),
            ("proj_lora1", "img_attn.proj"),
            ("qkv_lora2", "txt_attn.qkv"),
            ("proj_lora2", "txt_attn.proj"),
        ):
            bfl = f"{b}.{module}"
            for prefix in ("", "diffusion_model."):
                add(f"{prefix}{b}.processor.{proc}", Target(bfl, 0, shapes[bfl][0], "xlabs", bfl))
    for i in range(params.depth_single_blocks):
        b = f"single_blocks.{i}"
        for prefix in ("", "diffusion_model."):
            add(
                f"{prefix}{b}.processor.qkv_lora",
                Target(f"{b}.linear1", 0, qkv_rows, "xlabs", f"{b}.linear1"),
            )
            add(
                f"{prefix}{b}.processor.proj_lora",
                Target(f"{b}.linear2", 0, shapes[f"{b}.linear2"][0], "xlabs", f"{b}.linear2"),
            )
        add(f"diffusion_model.{b}.linear1_qkv", Target(f"{b}.linear1", 0, qkv_rows, "comfyui", f"{b}.linear1"))


Roles = dict[str, tuple[str, Tensor]]
"""One module's tensors of a file: ``role -> (key, tensor)``, roles as :func:`split_suffix` names them."""


def split_suffix(key: str) -> tuple[str, str] | None:
    """``key -> (base name, role)`` with a role of :data:`SUFFIXES`; None for other suffixes."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _key_layout(key: str) -> str | None:
    if key.startswith("lora_unet_"):
        return "kohya"
    if key.startswith("lora_transformer_"):
        return "onetrainer"
    if key.startswith("lycoris_"):
        return "lycoris"
    if ".processor." in key:
        return "xlabs"
    if key.startswith("transformer."):
        return "diffusers"
    if key.startswith("diffusion_model."):
        return "comfyui"
    if key.startswith("base_model.model.") or key.startswith(_BFL_TOP):
        return "peft"
    if key.startswith(_DIFFUSERS_TOP):
        return "diffsynth"
    return None


def detect_layout(keys: Iterable[str]) -> str:
    """The layout most keys follow (one of :data:`LAYOUTS`), or ``"unknown"``. Needs no model params."""
    counts = Counter(layout for k in keys if (layout := _key_layout(k)) is not None)
    if not counts:
        return "unknown"
    return max(LAYOUTS, key=lambda layout: counts[layout])


def alpha_value(key: str, t: Tensor, source: str) -> float:
    """The value of an ``.alpha`` tensor (0-dim or one element, any float or int dtype)."""
    if t.numel() != 1:
        raise LoraFormatError(f"{source}: alpha key {key!r} has shape {tuple(t.shape)}, expected a scalar")
    value = float(t.reshape(-1)[0].item())
    if not math.isfinite(value):
        raise LoraFormatError(f"{source}: alpha key {key!r} is {value}")
    return value


def pair_error(t: Target, down: Tensor, up: Tensor, in_features: int) -> str | None:
    """Why ``down``/``up`` cannot be a LoRA for ``t``, or None."""
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        return f"down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair"
    if down.shape[1] != in_features or up.shape[0] != t.rows:
        return (
            f"down {tuple(down.shape)}, up {tuple(up.shape)}; {t.bfl} expects down [r, {in_features}], up [{t.rows}, r]"
        )
    return None


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t if t.dtype.itemsize > 1 else t.float()).all())  # fp8 has no isfinite kernel


def non_finite(sd: dict[str, Tensor]) -> str | None:
    """Which float tensors of ``sd`` hold NaN or Inf (keys named), or None."""
    bad = sorted(k for k, t in sd.items() if t.is_floating_point() and not _finite(t))
    if not bad:
        return None
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"key {', '.join(repr(k) for k in bad[:5])}{more} holds NaN or Inf"


# Key fragments of LoRA kinds this reader does not apply -> what they are.
_UNAPPLIED_KINDS = (
    (".dora_scale", "DoRA (dora_scale)"),
    (".lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".hada_", "LyCORIS LoHa (hada_*)"),
    (".lokr_", "LyCORIS LoKr (lokr_*)"),
    (".diff", "full weight patches (.diff / .diff_b)"),
    ("lora_te", "text-encoder LoRA (lora_te*)"),
    ("text_encoder", "text-encoder LoRA"),
    (".bias", "biases"),
    (".norm", "norm keys"),
)


def unapplied_message(source: str, keys: list[str]) -> str:
    """One line naming the keys a reader would leave out, the kinds they belong to, and the opt-out."""
    kinds = sorted({kind for frag, kind in _UNAPPLIED_KINDS for k in keys if frag in k})
    what = f" ({', '.join(kinds)})" if kinds else ""
    shown = ", ".join(repr(k) for k in sorted(keys)[:8])
    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    return (
        f"{source}: {len(keys)} keys cannot be applied to this model{what}: {shown}{more}; applying the rest "
        "would give a different model than the file's author meant (allow_partial=True / --allow-partial "
        "applies it anyway)"
    )
