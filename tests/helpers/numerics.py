"""The one relative-error function of the tests."""

from __future__ import annotations

from typing import Literal

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor, norm: Literal["l2", "max"] = "l2") -> float:
    """``|got - want| / |want|`` in float32: the L2 (Frobenius) norm over all elements, or with ``norm="max"``
    the largest absolute value (the worst element against the largest)."""
    diff, ref = got.float() - want.float(), want.float()
    if norm == "max":
        return float(diff.abs().max() / ref.abs().max())
    return float(diff.norm() / ref.norm())


def assert_same_output(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    """``got`` equals ``want`` up to float32 rounding (relative max error 1e-5), and ``want`` is visibly away from
    ``base`` (by more than 1 %), so the equality proves something: e.g. a LoRA's effect, merged two ways."""
    err, effect = rel_err(got, want, "max"), rel_err(base, want, "max")
    assert effect > 1e-2, f"the LoRA barely changes the output ({effect:.1e}): the test would prove nothing"
    assert err <= 1e-5, f"relative max error {err:.2e} (LoRA effect {effect:.2e})"
