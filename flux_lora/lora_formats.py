"""LoRA weights in one canonical form, and the file layouts other tools use.

Canonical form: ``dict[str, LoraWeight]`` keyed by the BFL module path of a Linear in :class:`flux_lora.model.Flux`
(``double_blocks.0.img_attn.qkv``, ``single_blocks.3.linear1``, ...), fused layouts kept fused. The update of a
module is ``delta_W = (alpha / rank) * up @ down``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
