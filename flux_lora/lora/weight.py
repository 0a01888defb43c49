"""One module's LoRA (``down``, ``up``, ``alpha``) and the exact fused <-> split row-block math."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flux_lora.model.layers import WRAPPED


@dataclass
class LoraWeight:
    """One module's LoRA: ``down [r, in]``, ``up [out, r]``, ``alpha`` (scale = alpha / r)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[out, in]`` weight update ``scale * up @ down``."""
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


LoraStateDict = dict[str, LoraWeight]
"""LoRAs by the BFL module path of their Linear (``double_blocks.0.img_attn.qkv``)."""


def clean_name(name: str) -> str:
    """A module name without the activation-checkpoint wrapper's part (the BFL path LoRAs are keyed by)."""
    return name.replace(f"{WRAPPED}.", "")


# ------------------------------------------------------------------------------------- fused <-> split math


def _same_scale(ws: list[LoraWeight]) -> bool:
    return all(w.alpha * ws[0].rank == ws[0].alpha * w.rank for w in ws[1:])


def fuse_row_blocks(blocks: list[tuple[int, LoraWeight]], out_features: int) -> LoraWeight:
    """LoRAs on row blocks of one Linear (``(first row, LoRA)``; rows not covered get no update) -> one LoRA.

    Exact. If all blocks share the same ``down`` (as after a fused->split export), the result keeps that
    ``down`` at rank r and stacks the ups. Otherwise the ranks are concatenated: ``down = cat(down_i)``,
    ``up`` block diagonal. Equal per-block scales are kept (alpha, or sum(alpha_i) for concatenated ranks);
    different scales are baked into ``up`` (float32) with ``alpha = rank``.
    """
    blocks = sorted(blocks, key=lambda b: b[0])
    (start0, w0) = blocks[0]
    if len(blocks) == 1 and start0 == 0 and w0.up.shape[0] == out_features:
        return w0
    ws = [w for _, w in blocks]
    same = _same_scale(ws)
    dtype = ws[0].up.dtype
    for w in ws:
        dtype = torch.promote_types(torch.promote_types(dtype, w.up.dtype), w.down.dtype)
    if not same:
        dtype = torch.promote_types(dtype, torch.float32)

    def part_up(w: LoraWeight) -> Tensor:
        return w.up.to(dtype) if same else w.scale * w.up.to(dtype)

    if all(w.down.shape == w0.down.shape and torch.equal(w.down, w0.down) for w in ws[1:]):
        up = w0.up.new_zeros((out_features, w0.rank), dtype=dtype)
        for start, w in blocks:
            up[start : start + w.up.shape[0]] = part_up(w)
        return LoraWeight(w0.down.to(dtype), up, w0.alpha if same else float(w0.rank))
    rank = sum(w.rank for w in ws)
    up = w0.up.new_zeros((out_features, rank), dtype=dtype)
    col = 0
    for start, w in blocks:
        up[start : start + w.up.shape[0], col : col + w.rank] = part_up(w)
        col += w.rank
    down = torch.cat([w.down.to(dtype) for w in ws])
    return LoraWeight(down, up, sum(w.alpha for w in ws) if same else float(rank))


def split_row_blocks(w: LoraWeight, sizes: list[int] | tuple[int, ...]) -> list[LoraWeight | None]:
    """One LoRA on a fused Linear -> one LoRA per block of ``sizes`` rows (None: no update). Exact.

    Blocks share ``down`` and take their rows of ``up``. When each block's non-zero ``up`` columns are
    disjoint from the others' (a LoRA fused from parts with different downs), each block keeps only its own
    rank columns.
    Blocks whose ``up`` is all zero are dropped unless every block is zero (an untrained LoRA keeps its
    modules).
    """
    ups = list(torch.split(w.up, list(sizes), dim=0))
    masks = [(u != 0).any(dim=0) for u in ups]
    live = [i for i, m in enumerate(masks) if m.any()]
    if not live:
        return [LoraWeight(w.down, u, w.alpha) for u in ups]
    out: list[LoraWeight | None] = [None] * len(ups)
    disjoint = len(live) > 1 and bool((torch.stack([masks[i].int() for i in live]).sum(0) <= 1).all())
    for i in live:
        if disjoint:
            m = masks[i]
            out[i] = LoraWeight(w.down[m], ups[i][:, m], w.alpha * int(m.sum()) / w.rank)
        else:
            out[i] = LoraWeight(w.down, ups[i], w.alpha)
    return out
