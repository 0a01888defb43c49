"""Model building and the training step shared by the CPU and GPU benchmarks.

Models get random weights (Linear weights ~ N(0, std^2), std 0.02 as in FLUX.1-dev's blocks), so nothing needs
downloading. :func:`materialise_` fills a model built on the meta device one block at a time, writing fp8
Linears straight into fp8, so neither host nor device ever holds a float copy of the whole model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_lora import sampling as S
from flux_lora.config import LoraConfig
from flux_lora.lora.peft_adapters import inject_lora
from flux_lora.model.flux import Flux, FluxParams
from flux_lora.model.fp8 import FP8Linear, default_predicate, dequantize_weight, quantize_
from flux_lora.model.layers import RMSNorm
from flux_lora.training.block_wrappers import enable_gradient_checkpointing

WEIGHT_STD = 0.02


@torch.no_grad()
def _init_leaf_(module: nn.Module, std: float, generator: torch.Generator | None) -> None:
    def normal(shape, device) -> Tensor:  # float32; copy_ casts to the parameter's dtype
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std

    if isinstance(module, FP8Linear):
        module.set_weight(normal(module.weight.shape, module.weight.device))
        if module.bias is not None:
            module.bias.copy_(normal(module.bias.shape, module.bias.device))
    elif isinstance(module, nn.Linear):
        module.weight.copy_(normal(module.weight.shape, module.weight.device))
        if module.bias is not None:
            module.bias.copy_(normal(module.bias.shape, module.bias.device))
    elif isinstance(module, RMSNorm):
        module.scale.fill_(1.0)
    else:  # other leaves with parameters (encoders, autoencoder, diffusers): norms at 1, biases at 0
        norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                p.zero_()
            elif norm:
                p.fill_(1.0)
            else:
                p.copy_(normal(p.shape, p.device))


def materialise_(
    model: nn.Module,
    device: str | torch.device,
    std: float = WEIGHT_STD,
    seed: int = 0,
    chunks: list[nn.Module] | None = None,
) -> nn.Module:
    """Give a meta-device model (already in its storage dtypes) random weights on ``device``, one chunk at a time
    (by default each top-level child and each double/single block); :class:`FP8Linear` layers are quantized from
    a float weight that exists for one layer only. Returns ``model``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for part in chunks if chunks is not None else _dit_chunks(model):
        part.to_empty(device=device)
        for m in part.modules():
            _init_leaf_(m, std, generator)
    return model


def _dit_chunks(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in model.children():
        out.extend(child if isinstance(child, nn.ModuleList) else [child])
    return out


def random_dit(
    params: FluxParams,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    seed: int = 0,
    quantize: str | None = None,
) -> Flux:
    """A DiT with random weights built through the meta device; ``quantize`` ("blocks"/"all") stores those
    Linears in fp8 (per-channel scaled) from the start."""
    with torch.device("meta"):
        model = Flux(params).to(dtype)
    if quantize:
        quantize_(model, default_predicate(quantize))
    return materialise_(model, device, seed=seed).eval()


class NaiveFP8Linear(FP8Linear):
    """The trap the reference warns about (autocast or ``weight.to(bf16)`` inside forward): fp8 storage, but
    autograd keeps the upcast float copy of every weight alive until backward. A control, not for use."""

    def forward(self, x: Tensor) -> Tensor:
        w = dequantize_weight(self.weight, self.weight_scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def variant(base: Flux, base_kind: str, *, rank: int = 16, checkpointing: bool = False, policy: str = "blocks") -> Flux:
    """A copy of a float ``base`` set up for LoRA training: ``base_kind`` is ``bf16`` (as is), ``fp8`` (our
    FP8Linear) or ``fp8_naive`` (:class:`NaiveFP8Linear`); LoRA ``rank`` on the default targets."""
    model = copy.deepcopy(base)
    if base_kind in ("fp8", "fp8_naive"):
        quantize_(model, default_predicate(policy))
        if base_kind == "fp8_naive":
            for m in model.modules():
                if type(m) is FP8Linear:
                    m.__class__ = NaiveFP8Linear
    elif base_kind != "bf16":
        raise ValueError(f"unknown base kind {base_kind!r}; use bf16, fp8 or fp8_naive")
    inject_lora(model, LoraConfig(rank=rank, alpha=rank))
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def make_batch(
    params: FluxParams,
    latent_h: int,
    latent_w: int,
    n_txt: int,
    *,
    batch: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A training batch as it comes from the caches: latents ``x0`` (packed), T5 states ``txt`` and CLIP ``y``
    of the model's widths, plus the step's noise and times (drawn here so every variant sees the same ones)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    c = params.in_channels // 4
    x0, noise = S.pack(randn(batch, c, latent_h, latent_w)), S.pack(randn(batch, c, latent_h, latent_w))
    t = S.sample_timesteps(batch, generator=g).to(device)
    return dict(
        x_t=S.add_noise(x0, noise, t),
        target=S.flow_target(x0, noise),
        t=t,
        txt=randn(batch, n_txt, params.context_in_dim),
        y=randn(batch, params.vec_in_dim),
        img_ids=S.img_ids(batch, latent_h, latent_w, device=device),
        txt_ids=S.txt_ids(batch, n_txt, device=device),
        guidance=torch.full((batch,), 3.5, device=device) if params.guidance_embed else None,
    )


def dit_loss(model: nn.Module, b: dict[str, Tensor], autocast: bool = True) -> Tensor:
    """Flow-matching MSE of the DiT on a cached batch (bf16 autocast, as Lightning's ``bf16-mixed``)."""
    device = b["x_t"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = model(
            img=b["x_t"],
            img_ids=b["img_ids"],
            txt=b["txt"],
            txt_ids=b["txt_ids"],
            timesteps=b["t"],
            y=b["y"],
            guidance=b["guidance"],
        )
    return F.mse_loss(out.float(), b["target"].float())


def train_step(loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> Tensor:
    """Forward, backward, optimizer step; returns the (detached) loss without a host sync."""
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def adamw(model: nn.Module, lr: float = 1e-4, **kwargs) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float32."""
    out, ref = out.float(), ref.float()
    err = float((out - ref).norm() / ref.norm())
    return err if math.isfinite(err) else float("inf")


def t5_xxl_config(**overrides):
    """transformers config of FLUX's T5 encoder (T5 v1.1 XXL), optionally shrunk by ``overrides``."""
    from transformers import T5Config

    cfg = dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5Config(**{**cfg, **overrides})


def clip_l_config(**overrides):
    """transformers config of FLUX's CLIP text encoder (ViT-L/14's), optionally shrunk by ``overrides``."""
    from transformers import CLIPTextConfig

    cfg = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextConfig(**{**cfg, **overrides})
