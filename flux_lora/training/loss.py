"""The flow-matching loss of one training step, from a batch of cached latents and text embeddings to the scalar.

One function, :func:`flow_matching_loss`, for the trainer (``FluxLoraModule``) and the benchmarks, so both run the
same step: noise, flow times (with the configured shift), caption dropout, embedded guidance, the DiT call and the
loss weighting. Every random draw comes from the given generator, on the CPU, in a fixed order (noise, times,
caption dropout, preservation prompts), so a step depends only on the generator's state, whatever the device.

Output preservation (:class:`OutputPreservation`) adds, on the same noisy latents and times, the MSE between the
adapted model's prediction for preservation prompts and the frozen base's (adapters disabled, no gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flux_lora import sampling as S
from flux_lora.config import TrainConfig
from flux_lora.model.flux import Flux
from flux_lora.model.text_encoders import TextEmbeddings


@dataclass(frozen=True)
class StepDraws:
    """The random part of a step, on the CPU: ``noise`` (packed, ``[B, N, 64]``), flow times ``t [B]`` and
    ``drop [B]`` (samples trained on the empty caption; ``None`` without caption dropout) and ``preserve [B]``
    (each sample's preservation prompt, an index; ``None`` without output preservation)."""

    noise: Tensor
    t: Tensor
    drop: Tensor | None
    preserve: Tensor | None = None


@dataclass(frozen=True)
class OutputPreservation:
    """Output preservation for a step: the cached ``embeddings`` of the preservation prompts (``txt [P, L, D]``,
    ``y [P, D]``, on the batch's device), the loss ``weight``, and ``base``: a context in which the DiT computes
    as the frozen base (adapters disabled). With ``per_sample`` = K, the prompts are each sample's own: row
    ``i * K + k`` is sample ``i``'s ``k``-th (``P = B * K``), and sample ``i`` draws its ``k``."""

    embeddings: TextEmbeddings
    weight: float
    base: Callable[[], AbstractContextManager[None]]
    per_sample: int | None = None

    def choices(self) -> int:
        """How many prompts each sample draws from."""
        return self.per_sample or len(self.embeddings.txt)

    def rows(self, drawn: Tensor) -> Tensor:
        """The embedding rows of the drawn choices ``drawn [B]``."""
        if self.per_sample is None:
            return drawn
        return torch.arange(len(drawn)) * self.per_sample + drawn


def draw(
    latents_shape: torch.Size, cfg: TrainConfig, generator: torch.Generator, preservation_prompts: int = 0
) -> StepDraws:
    """Noise, times, caption dropout and (with ``preservation_prompts`` > 0) each sample's preservation prompt for
    latents of ``latents_shape`` (``[B, C, h, w]``), in that order."""
    b, _, h, w = latents_shape
    noise = S.pack(torch.randn(latents_shape, generator=generator))
    t = S.sample_timesteps(
        b,
        cfg.timestep_sampling,
        seq_len=S.image_seq_len(h, w) if cfg.shift == "flux" else None,
        shift=cfg.fixed_shift if cfg.shift == "fixed" else None,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        sigmoid_scale=cfg.sigmoid_scale,
        generator=generator,
    )
    drop = torch.rand(b, generator=generator) < cfg.caption_dropout if cfg.caption_dropout > 0 else None
    preserve = torch.randint(preservation_prompts, (b,), generator=generator) if preservation_prompts else None
    return StepDraws(noise, t, drop, preserve)


def drop_captions(txt: Tensor, y: Tensor, drop: Tensor, empty: TextEmbeddings) -> tuple[Tensor, Tensor]:
    """``txt``/``y`` with the samples where ``drop`` is set replaced by the empty caption's embedding."""
    empty = empty.to(device=txt.device)  # a no-op when the caller keeps it on the batch's device
    drop = drop.to(txt.device)
    txt = torch.where(drop[:, None, None], empty.txt.to(txt.dtype), txt)
    y = torch.where(drop[:, None], empty.y.to(y.dtype), y)
    return txt, y


def dit_inputs(
    batch: dict[str, Tensor],
    draws: StepDraws,
    guidance: float | None,
    dtype: torch.dtype,
    empty: TextEmbeddings | None,
) -> tuple[dict[str, Tensor | None], Tensor]:
    """The DiT's keyword arguments for a step (BFL names; the noisy image in ``dtype``, ``guidance`` None for a
    model without the guidance input), and the velocity target ``[B, N, 64]`` (float32).

    A batch with ``reference`` latents (FLUX.1 Kontext pairs) gets their tokens appended after the ``N`` noisy ones,
    clean, with :func:`~flux_lora.sampling.reference_ids`; the DiT's output is then ``N + M`` tokens, of which
    the loss takes the first ``N`` (:func:`target_tokens`)."""
    latents = batch["latents"]
    b, _, h, w = latents.shape
    x0 = S.pack(latents.float())
    noise, t = draws.noise.to(x0.device), draws.t.to(x0.device)
    txt, y = batch["txt"], batch["y"]
    if draws.drop is not None:
        if empty is None:
            raise ValueError("train.caption_dropout needs the cached empty-caption embedding")
        txt, y = drop_captions(txt, y, draws.drop, empty)
    img, ids = S.add_noise(x0, noise, t).to(dtype), S.img_ids(b, h, w, device=x0.device)
    reference = batch.get("reference")
    if reference is not None:
        rh, rw = reference.shape[-2:]
        img = torch.cat([img, S.pack(reference.float()).to(dtype)], dim=1)
        ids = torch.cat([ids, S.reference_ids(b, rh, rw, device=x0.device)], dim=1)
    inputs = dict(
        img=img,
        img_ids=ids,
        txt=txt,
        txt_ids=S.txt_ids(b, txt.shape[1], device=x0.device),
        timesteps=t,
        y=y,
        guidance=None if guidance is None else torch.full((b,), guidance, device=x0.device),
    )
    return inputs, S.flow_target(x0, noise)


def target_tokens(pred: Tensor, target: Tensor) -> Tensor:
    """The prediction for the target's tokens: the first ``N`` (a Kontext reference's tokens follow them)."""
    return pred[:, : target.shape[1]]


def weighted_mse(
    pred: Tensor,
    target: Tensor,
    t: Tensor,
    weighting: str,
    mask: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Mean over the batch of each sample's MSE (in float32) times its loss weight at time ``t`` and its
    ``sample_weight`` ``[B]`` (its dataset's ``data.loss_weight``, e.g. regularization images). A loss ``mask``
    ``[B, h, w]`` on the latent grid weights each latent pixel: the MSE is then the mask-weighted mean."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is None:
        per_sample = err.mean(dim=(1, 2))
    else:
        channels = pred.shape[-1] // 4  # packed tokens are 2x2 latent pixels of all channels
        weights = S.pack(mask.float()[:, None].expand(-1, channels, -1, -1))
        per_sample = (err * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp_min(1e-8)
    per_sample = per_sample * S.loss_weight(t, weighting)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample.device, torch.float32)
    return per_sample.mean()


def preservation_loss(adapted: Tensor, base: Tensor, t: Tensor, weighting: str) -> Tensor:
    """Output preservation: the adapted model's prediction ``adapted`` against the frozen base's ``base`` on the
    same inputs (a target: no gradient flows into it), weighted per time as the flow-matching loss."""
    return weighted_mse(adapted, base.detach(), t, weighting)


def with_prompts(
    inputs: dict[str, Tensor | None], embeddings: TextEmbeddings, index: Tensor
) -> dict[str, Tensor | None]:
    """``inputs`` with each sample's text replaced by prompt ``index[i]`` of ``embeddings`` (the noisy image, its
    ids, times and guidance unchanged)."""
    img = inputs["img"]
    assert img is not None
    index = index.to(embeddings.txt.device)
    txt = embeddings.txt[index].to(img.device)
    return {
        **inputs,
        "txt": txt,
        "y": embeddings.y[index].to(img.device),
        "txt_ids": S.txt_ids(img.shape[0], txt.shape[1], device=img.device),
    }


def flow_matching_loss(
    dit: Flux,
    batch: dict[str, Tensor],
    cfg: TrainConfig,
    generator: torch.Generator,
    empty_embedding: TextEmbeddings | None = None,
    preservation: OutputPreservation | None = None,
) -> Tensor:
    """The training loss of ``dit`` on ``batch`` (``latents [B, C, h, w]``, ``txt [B, L, D]``, ``y [B, D]``).

    ``empty_embedding`` (``txt [1, L, D]``, ``y [1, D]``) is needed when ``cfg.caption_dropout > 0``. With
    ``preservation``, the output-preservation loss of the same noisy latents and times, each sample paired with a
    drawn preservation prompt, is added times its weight: the base pass first (no gradient), then the adapted one.
    """
    if cfg.caption_dropout > 0 and empty_embedding is None:
        raise ValueError("train.caption_dropout needs the cached empty-caption embedding")
    prompts = preservation.choices() if preservation is not None else 0
    draws = draw(batch["latents"].shape, cfg, generator, prompts)
    guidance = cfg.guidance if dit.params.guidance_embed else None
    # float biases carry the compute dtype, also on fp8 layers (a bf16 DiT without autocast needs bf16)
    inputs, target = dit_inputs(batch, draws, guidance, dit.img_in.bias.dtype, empty_embedding)
    pred = target_tokens(dit(**inputs), target)
    t = draws.t.to(target.device)
    loss = weighted_mse(pred, target, t, cfg.loss_weighting, batch.get("mask"), batch.get("weight"))
    if preservation is None or draws.preserve is None:
        return loss
    kept = with_prompts(inputs, preservation.embeddings, preservation.rows(draws.preserve))
    with torch.no_grad(), preservation.base():
        base = target_tokens(dit(**kept), target)
    adapted = target_tokens(dit(**kept), target)
    return loss + preservation.weight * preservation_loss(adapted, base, t, cfg.loss_weighting)
