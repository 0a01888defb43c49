"""The sampling loop shared by the pipeline and the trainer's preview images: Euler steps of the flow ODE, with
optional true CFG and per-call ControlNet residuals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flux_lora.model.flux import ControlResiduals
from flux_lora.model.text_encoders import TextEmbeddings
from flux_lora.sampling import euler_step


@dataclass
class DiTInputs:
    """The inputs of one DiT call during sampling (twice per step with true CFG: ``negative`` tells which)."""

    step: int
    img: Tensor
    img_ids: Tensor
    txt: Tensor
    txt_ids: Tensor
    timesteps: Tensor
    y: Tensor
    guidance: Tensor | None
    negative: bool = False


ControlProvider = Callable[[DiTInputs], ControlResiduals | None]
"""Per-call ControlNet residuals (``None`` for none), e.g. from one or several ControlNets summed."""
StepCallback = Callable[[int, float, Tensor], None]
"""Called after each step with ``(step index, t of the step, latents [B, N, C] after it)``."""


def _velocity(model: nn.Module, inputs: DiTInputs, controls: ControlProvider | None) -> Tensor:
    residuals = controls(inputs) if controls is not None else None
    return model(
        img=inputs.img,
        img_ids=inputs.img_ids,
        txt=inputs.txt,
        txt_ids=inputs.txt_ids,
        timesteps=inputs.timesteps,
        y=inputs.y,
        guidance=inputs.guidance,
        controls=residuals,
    )


def denoise(
    model: nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    y: Tensor,
    timesteps: list[float],
    guidance: float | None,
    *,
    neg: TextEmbeddings | None = None,
    true_cfg: float = 1.0,
    controls: ControlProvider | None = None,
    callback: StepCallback | None = None,
    img_cond: Tensor | None = None,
    reference: Tensor | None = None,
) -> Tensor:
    """Integrate the flow ODE from ``timesteps[0]`` to ``timesteps[-1]`` with Euler steps.

    Args:
        img: ``[B, N, C]`` packed noise; the state is kept in its dtype (float32 recommended) and cast to the
            compute dtype (that of ``txt``) for each DiT call.
        img_ids, txt_ids: ``[B, N, 3]`` and ``[B, L, 3]`` position ids.
        txt, y: ``[B, L, D]`` T5 states and ``[B, d]`` CLIP vectors, in the compute dtype.
        timesteps: ``num_steps + 1`` times from 1 (noise) down to 0 (see :func:`sampling.get_schedule`).
        guidance: embedded guidance strength (dev), ``None`` for models without guidance (schnell).
        neg: negative-prompt embeddings (batch ``B``) for true CFG: ``v = v_neg + true_cfg * (v - v_neg)``.
        controls: per-call ControlNet residual provider.
        img_cond: ``[B, N, C']`` structure latents concatenated to the image channels at every call (a DiT with
            a control LoRA's widened ``img_in``).
        reference: ``[B, M, C]`` Kontext reference tokens appended after the image tokens at every call
            (``img_ids`` then holds ``N + M`` ids: the image's, then the reference's); the prediction is sliced
            back to the ``N`` image tokens.

    Returns:
        ``[B, N, C]`` latents at ``timesteps[-1]``, in the dtype of ``img``.
    """
    dtype, batch = txt.dtype, img.shape[0]
    g = None if guidance is None else torch.full((batch,), float(guidance), device=img.device, dtype=dtype)
    use_cfg = neg is not None and true_cfg != 1.0
    for i, (t_cur, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        t_vec = torch.full((batch,), t_cur, device=img.device, dtype=dtype)
        x = img.to(dtype) if img_cond is None else torch.cat([img.to(dtype), img_cond.to(dtype)], dim=-1)
        if reference is not None:
            x = torch.cat([x, reference.to(dtype)], dim=1)
        v = _velocity(model, DiTInputs(i, x, img_ids, txt, txt_ids, t_vec, y, g), controls)[:, : img.shape[1]]
        if use_cfg and neg is not None:
            neg_inputs = DiTInputs(i, x, img_ids, neg.txt, txt_ids, t_vec, neg.y, g, negative=True)
            v_neg = _velocity(model, neg_inputs, controls)[:, : img.shape[1]]
            v = v_neg + true_cfg * (v - v_neg)
        img = euler_step(img, v, t_cur, t_prev)
        if callback is not None:
            callback(i, t_cur, img)
    return img
