"""Weight patches beyond a plain LoRA: LyCORIS LoHa and LoKr, full ``.diff`` / ``.diff_b`` patches, LoRA biases
(peft's and BFL control LoRAs' ``lora_B.bias``) and DoRA (``dora_scale`` / peft's ``lora_magnitude_vector``);
and the RMSNorm scale overrides of BFL control LoRAs (:class:`NormOverride`).

Each :class:`Patch` covers rows ``[start, start + rows)`` of one Linear. At user strength ``s`` it changes the
layer to ``W + s * D`` and ``b + s * db``, where ``D`` and ``db`` are the dense changes at strength 1:

- LoHa: ``D = (alpha / r) * (w1a @ w1b) * (w2a @ w2b)`` (element-wise product; ``r = w1b.shape[0]``)
- LoKr: ``D = (alpha / r) * kron(w1, w2)``, ``w1`` / ``w2`` full or ``a @ b``; ``r`` is the inner size of the
  decomposed factor (``w2``'s if both are), and the scale is 1 when neither is decomposed or alpha is missing
- LoRA: ``D = (alpha / r) * up @ down``; diff: ``D = diff``; ``db`` = ``diff_b`` as is, or ``lora_B.bias`` times
  the pair's ``alpha / r`` as peft adds it (``bias * scaling``). A file without alpha (BFL control LoRAs, whose
  ``LinearLora`` has scale 1) has alpha = r, so its bias is added as is there too, as ComfyUI does.
- DoRA (magnitude ``m``): ``D = m * (W + D0) / N - W`` with ``D0`` the change above, plus float32 eps in ``N``.
  ``m`` ``[out, 1]`` / ``[out]`` (peft, LyCORIS ``wd_on_out``) scales each output row, ``[1, in]`` (LyCORIS'
  default) each input column. ``N`` by :data:`DoraNorm`: ``"peft"`` (the default) is the norm of ``W + D0`` per
  row or column, as peft and LyCORIS, which train these files, compute it; ``"comfyui"`` is ComfyUI's
  ``weight_decompose``, which takes the row norm of the original ``W`` for an ``[out, 1]`` ``m`` (and the column
  norm of ``W + D0`` for ``[1, in]``, as peft). Strength ``s`` then gives ``W + s * D`` as in ComfyUI.

Everything is computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from flux_lora.lora.weight import LoraWeight

DoraNorm = Literal["peft", "comfyui"]
"""Which norm an ``[out, 1]`` DoRA magnitude divides by: ``"peft"`` ``||W + D0||`` (peft, LyCORIS) or
``"comfyui"`` ``||W||`` (ComfyUI's ``weight_decompose``); ``[1, in]`` magnitudes use ``||W + D0||`` in both."""
DORA_NORMS: tuple[str, ...] = get_args(DoraNorm)


def check_dora_norm(value: str) -> DoraNorm:
    """``value`` if it is a :data:`DoraNorm`; otherwise one clear error."""
    if value not in DORA_NORMS:
        raise ValueError(f"dora_norm must be one of {list(DORA_NORMS)}, got {value!r}")
    return value  # type: ignore[return-value]


@dataclass
class LoHa:
    """LyCORIS LoHa: ``hada_w1_a [out, r]``, ``hada_w1_b [r, in]``, ``hada_w2_a``, ``hada_w2_b``, alpha."""

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    alpha: float | None

    def delta(self) -> Tensor:
        scale = 1.0 if self.alpha is None else self.alpha / self.w1b.shape[0]
        return scale * (self.w1a.float() @ self.w1b.float()) * (self.w2a.float() @ self.w2b.float())

    def shape(self) -> tuple[int, int]:
        return self.w1a.shape[0], self.w1b.shape[1]


@dataclass
class LoKr:
    """LyCORIS LoKr: each factor full (``lokr_w1``) or decomposed (``lokr_w1_a @ lokr_w1_b``), alpha."""

    w1: Tensor | tuple[Tensor, Tensor]
    w2: Tensor | tuple[Tensor, Tensor]
    alpha: float | None

    def delta(self) -> Tensor:
        rank = None
        for w in (self.w1, self.w2):  # w2's rank wins when both are decomposed, as in ComfyUI
            if isinstance(w, tuple):
                rank = w[1].shape[0]
        scale = 1.0 if self.alpha is None or rank is None else self.alpha / rank
        return scale * torch.kron(_full(self.w1), _full(self.w2))

    def shape(self) -> tuple[int, int]:
        (a, b), (c, d) = _shape(self.w1), _shape(self.w2)
        return a * c, b * d


def _full(w: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    return w[0].float() @ w[1].float() if isinstance(w, tuple) else w.float()


def _shape(w: Tensor | tuple[Tensor, Tensor]) -> tuple[int, int]:
    if isinstance(w, tuple):
        return w[0].shape[0], w[1].shape[1]
    return tuple(w.shape)  # type: ignore[return-value]


WeightChange = LoraWeight | LoHa | LoKr | Tensor  # Tensor: a full ``.diff``


@dataclass
class Patch:
    """What a file holds for rows ``[start, start + rows)`` of one Linear beyond (or instead of) a plain LoRA."""

    start: int
    rows: int
    weight: WeightChange | None = None
    bias: Tensor | None = None  # ``.diff_b`` / ``lora_B.bias``: [rows]
    dora_scale: Tensor | None = None  # [rows, 1] / [rows] (per output row) or [1, in] (per input column)
    dora_norm: DoraNorm = "peft"  # which norm a per-row magnitude divides by (see DoraNorm)

    @property
    def kinds(self) -> list[str]:
        names = {LoraWeight: "LoRA", LoHa: "LoHa", LoKr: "LoKr"}
        kinds = [names.get(type(self.weight), "diff")] if self.weight is not None else []
        return kinds + (["bias"] if self.bias is not None else []) + (["DoRA"] if self.dora_scale is not None else [])

    def weight_shape(self) -> tuple[int, int] | None:
        w = self.weight
        if w is None:
            return None
        if isinstance(w, LoraWeight):
            return w.up.shape[0], w.down.shape[1]
        return w.shape() if isinstance(w, LoHa | LoKr) else tuple(w.shape)  # type: ignore[return-value]

    def delta(self, weight: Tensor) -> Tensor | None:
        """Dense float32 change of these rows at strength 1, given their current weight ``[rows, in]``."""
        w = self.weight
        d = None if w is None else (w.delta() if not isinstance(w, Tensor) else w.float())
        if self.dora_scale is None:
            return d
        base = weight.float()
        merged = base if d is None else base + d
        m = self.dora_scale.float().reshape(_dora_axis(self.dora_scale, merged))
        normed = base if self.dora_norm == "comfyui" and _per_row(self.dora_scale, merged) else merged
        return merged * (m / _norm(normed, self.dora_scale)) - base


def _dora_axis(m: Tensor, merged: Tensor) -> tuple[int, int]:
    return (merged.shape[0], 1) if _per_row(m, merged) else (1, merged.shape[1])


def _per_row(m: Tensor, merged: Tensor) -> bool:
    return m.numel() == merged.shape[0] and not (m.ndim == 2 and m.shape[0] == 1 and merged.shape[0] != 1)


def _norm(merged: Tensor, m: Tensor) -> Tensor:
    eps = torch.finfo(torch.float32).eps
    if _per_row(m, merged):
        return merged.norm(dim=1, keepdim=True) + eps
    return merged.norm(dim=0, keepdim=True) + eps


ModuleChange = LoraWeight | tuple[Patch, ...]
"""A module's entry in a read file: a plain LoRA, or patches on row blocks (which need the layer's weight)."""


@dataclass
class NormOverride:
    """A full replacement of an RMSNorm scale (BFL control LoRAs' ``*.norm.query_norm.scale`` /
    ``key_norm.scale``), keyed by the parameter's path. It replaces the scale whatever the user's strength, as
    ComfyUI (``set_weight``) and diffusers do, and is restored exactly when the LoRA is removed."""

    scale: Tensor

    kinds = ("norm override",)


Change = ModuleChange | NormOverride
"""Any entry of a read file: a Linear's change (by module path) or a norm override (by parameter path)."""


def input_width(change: ModuleChange) -> int | None:
    """The input width a module's change takes (None when no patch changes the weight)."""
    if isinstance(change, LoraWeight):
        return change.down.shape[1]
    shapes = [p.weight_shape() for p in change]
    return max((s[1] for s in shapes if s is not None), default=None)


def dense_change(change: ModuleChange, weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(D [out, in], db [out] or None)``: the module's dense change at strength 1 given its weight ``W``."""
    if isinstance(change, LoraWeight):
        return change.delta(), None
    out_f = weight.shape[0]
    d = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    db = None
    for p in change:
        rows = slice(p.start, p.start + p.rows)
        part = p.delta(weight[rows])
        if part is not None:
            d[rows] += part.to(d.device)
        if p.bias is not None:
            db = torch.zeros(out_f, dtype=torch.float32, device=weight.device) if db is None else db
            db[rows] += p.bias.float().reshape(-1).to(db.device)
    return d, db


# ------------------------------------------------------------------------------------------- reading


def _get(roles: dict[str, tuple[str, Tensor]], role: str) -> Tensor | None:
    return roles[role][1] if role in roles else None


def _lokr_factor(roles: dict[str, tuple[str, Tensor]], n: int) -> Tensor | tuple[Tensor, Tensor] | None:
    full, a, b = _get(roles, f"lokr_w{n}"), _get(roles, f"lokr_w{n}_a"), _get(roles, f"lokr_w{n}_b")
    if full is not None:
        return full
    return (a, b) if a is not None and b is not None else None


def weight_change(
    roles: dict[str, tuple[str, Tensor]], lora_alpha: float | None, alpha: float | None
) -> WeightChange | None:
    """The weight part of a module's keys (LoRA, LoHa, LoKr or diff), or None; raises ValueError if incomplete.

    ``lora_alpha``: the alpha a plain down/up pair gets (its own, a peft config's, or its rank).
    """
    kinds: list[WeightChange] = []
    if "down" in roles or "up" in roles:
        if "down" not in roles or "up" not in roles:
            raise ValueError("a LoRA down without its up, or the reverse")
        down, up = roles["down"][1], roles["up"][1]
        kinds.append(LoraWeight(down, up, float(down.shape[0]) if lora_alpha is None else lora_alpha))
    hada = [_get(roles, f"hada_w{i}") for i in ("1_a", "1_b", "2_a", "2_b")]
    if any(h is not None for h in hada):
        w1a, w1b, w2a, w2b = hada
        if w1a is None or w1b is None or w2a is None or w2b is None:
            raise ValueError("LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
        kinds.append(LoHa(w1a, w1b, w2a, w2b, alpha))
    if any(r.startswith("lokr_") for r in roles):
        w1, w2 = _lokr_factor(roles, 1), _lokr_factor(roles, 2)
        if w1 is None or w2 is None:
            raise ValueError("LoKr needs lokr_w1 (or lokr_w1_a and _b) and lokr_w2 (or lokr_w2_a and _b)")
        kinds.append(LoKr(w1, w2, alpha))
    if "diff" in roles:
        kinds.append(roles["diff"][1])
    if len(kinds) > 1:
        raise ValueError("more than one kind of weight change (LoRA, LoHa, LoKr, diff) for one module")
    return kinds[0] if kinds else None


def bias_change(roles: dict[str, tuple[str, Tensor]], weight: WeightChange | None) -> Tensor | None:
    """The bias change of a module's keys: ``diff_b`` as is, or ``lora_B.bias`` times its pair's ``alpha / r``
    (peft adds ``bias * scaling``; a file without alpha, such as a BFL control LoRA, has scale 1)."""
    if "diff_b" in roles:
        return roles["diff_b"][1]
    if "bias" not in roles:
        return None
    bias = roles["bias"][1]
    if isinstance(weight, LoraWeight) and weight.scale != 1.0:
        return bias.float() * weight.scale
    return bias


def check_patch(p: Patch, in_features: int) -> str | None:
    """Why ``p`` does not fit ``rows x in_features``, or None."""
    shape = p.weight_shape()
    if shape is not None and tuple(shape) != (p.rows, in_features):
        return f"the weight change is {tuple(shape)}, the module takes ({p.rows}, {in_features})"
    if p.bias is not None and p.bias.numel() != p.rows:
        return f"the bias change has {p.bias.numel()} values for {p.rows} rows"
    if isinstance(p.weight, LoraWeight) and p.weight.down.shape[0] != p.weight.up.shape[1]:
        return "down and up are not a LoRA pair"
    m = p.dora_scale
    if m is not None and m.numel() not in (p.rows, in_features):
        return f"dora_scale has shape {tuple(m.shape)}; expected [{p.rows}, 1] or [1, {in_features}]"
    return None
