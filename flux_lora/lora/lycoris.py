"""Adapter kinds beyond plain LoRA in the kohya / LyCORIS file layout that ComfyUI and Forge apply.

A module of kind (see :func:`kind_of`) ``loha``, ``lokr`` or ``dora`` is one full-row :class:`Patch`; its keys, under
the kohya base name ``lora_unet_<bfl path with _>`` of the fused BFL Linear (fused qkv, ``linear1``: the layers a
LoHa or LoKr was trained on, so nothing is split), are those LyCORIS writes:

- LoHa: ``hada_w1_a [out, r]``, ``hada_w1_b [r, in]``, ``hada_w2_a``, ``hada_w2_b``, ``alpha`` (scale alpha / r)
- LoKr: ``lokr_w1`` or ``lokr_w1_a`` / ``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a`` / ``lokr_w2_b``, ``alpha``
  (scale alpha / r of the decomposed factor, w2's first; no alpha and scale 1 when both factors are full)
- DoRA: ``lora_down.weight``, ``lora_up.weight``, ``alpha`` and ``dora_scale [out, 1]`` (the magnitude per
  output row, of ``W + (alpha / r) up @ down``)

:func:`network_metadata` gives the ``ss_network_*`` entries LyCORIS' kohya wrapper writes for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict

from torch import Tensor

from flux_lora.config import LoraConfig, block_indices
from flux_lora.lora.patches import LoHa, LoKr, ModuleChange, Patch
from flux_lora.lora.weight import LoraWeight

KINDS = ("lora", "dora", "loha", "lokr")
LYCORIS_MODULE = "lycoris.kohya"


def kind_of(change: ModuleChange) -> str:
    """``lora``, ``dora``, ``loha``, ``lokr``, or ``other`` (row-block patches, biases, diffs, column DoRA)."""
    if isinstance(change, LoraWeight):
        return "lora"
    if len(change) != 1 or change[0].start != 0 or change[0].bias is not None:
        return "other"
    p = change[0]
    if isinstance(p.weight, LoraWeight):
        m = p.dora_scale
        return "dora" if m is not None and m.numel() == p.rows and (m.ndim == 1 or m.shape[-1] == 1) else "other"
    if p.dora_scale is not None:
        return "other"
    return "loha" if isinstance(p.weight, LoHa) else "lokr" if isinstance(p.weight, LoKr) else "other"


def _alpha(value: float) -> Tensor:
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def kohya_tensors(base: str, change: ModuleChange) -> dict[str, Tensor]:
    """The file's tensors of one module of kind lora, dora, loha or lokr under kohya base name ``base``."""
    kind = kind_of(change)
    if isinstance(change, LoraWeight):
        return {
            f"{base}.lora_down.weight": change.down,
            f"{base}.lora_up.weight": change.up,
            f"{base}.alpha": _alpha(change.alpha),
        }
    if kind == "other":
        raise ValueError(f"{base}: {'+'.join(p for q in change for p in q.kinds)} on row blocks cannot be written")
    p: Patch = change[0]
    w = p.weight
    if isinstance(w, LoraWeight):
        assert p.dora_scale is not None
        return {**kohya_tensors(base, w), f"{base}.dora_scale": p.dora_scale.reshape(-1, 1)}
    if isinstance(w, LoHa):
        out = {f"{base}.hada_w{k}": t for k, t in (("1_a", w.w1a), ("1_b", w.w1b), ("2_a", w.w2a), ("2_b", w.w2b))}
        return out | ({} if w.alpha is None else {f"{base}.alpha": _alpha(w.alpha)})
    assert isinstance(w, LoKr)
    out = {}
    for n, f in ((1, w.w1), (2, w.w2)):
        if isinstance(f, tuple):
            out[f"{base}.lokr_w{n}_a"], out[f"{base}.lokr_w{n}_b"] = f
        else:
            out[f"{base}.lokr_w{n}"] = f
    return out | ({} if w.alpha is None else {f"{base}.alpha": _alpha(w.alpha)})


def rank_of(change: ModuleChange) -> int | None:
    """The module's rank as kohya's ``ss_network_dim`` counts it (None for a LoKr of two full factors)."""
    if isinstance(change, LoraWeight):
        return change.rank
    w = change[0].weight
    if isinstance(w, LoraWeight):
        return w.rank
    if isinstance(w, LoHa):
        return w.w1b.shape[0]
    if isinstance(w, LoKr):
        for f in (w.w2, w.w1):
            if isinstance(f, tuple):
                return f[1].shape[0]
    return None


def alpha_of(change: ModuleChange) -> float | None:
    if isinstance(change, LoraWeight):
        return change.alpha
    w = change[0].weight
    return w.alpha if isinstance(w, LoraWeight | LoHa | LoKr) else None


def network_metadata(weights: Mapping[str, ModuleChange]) -> dict[str, str]:
    """``ss_network_module`` and ``ss_network_args`` as LyCORIS' kohya wrapper writes them for the kind the modules
    share (empty for plain LoRA: the caller's kohya defaults stand)."""
    kinds = {kind_of(c) for c in weights.values()}
    if kinds <= {"lora"}:
        return {}
    if len(kinds) > 1 or "other" in kinds:
        raise ValueError(f"the modules mix adapter kinds {sorted(kinds)}; one file holds one kind")
    kind = kinds.pop()
    return {"ss_network_module": LYCORIS_MODULE, "ss_network_args": json.dumps(_algo_args(kind))}


def _algo_args(kind: str) -> dict[str, str]:
    return {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"} if kind == "dora" else {"algo": kind}


ADAPTER_METADATA_KEY = "flux_lora.adapter"


def _indices_text(indices: list[int] | None) -> str | None:
    """``[0, 1, 2, 5]`` -> ``0-2,5`` (kohya's train_*_block_indices syntax)."""
    if indices is None:
        return None
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def training_metadata(cfg: LoraConfig) -> dict[str, str]:
    """What a trained file records of its adapters: ``ss_network_args`` as LyCORIS (algo, factor, decompose_both)
    and kohya's FLUX network (``train_double_block_indices`` / ``train_single_block_indices``) write them, and the
    whole ``lora`` section as JSON under ``flux_lora.adapter`` (ranks and alphas by glob included)."""
    args = _algo_args(cfg.kind) if cfg.kind != "lora" else {}
    if cfg.kind == "lokr":
        args |= {"factor": str(cfg.lokr_factor), "decompose_both": str(cfg.decompose_both)}
    for family in ("double", "single"):
        text = _indices_text(block_indices(getattr(cfg, f"{family}_blocks"), f"lora.{family}_blocks"))
        if text is not None:
            args[f"train_{family}_block_indices"] = text
    meta = {"ss_network_args": json.dumps(args), ADAPTER_METADATA_KEY: json.dumps(asdict(cfg))}
    if cfg.kind != "lora":
        meta["ss_network_module"] = LYCORIS_MODULE
    return meta
