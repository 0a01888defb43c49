"""Model building, the training step and the timing helpers shared by the CPU and GPU benchmarks.

The step is the trainer's: :func:`flux_lora.training.loss.flow_matching_loss` with the shipped experiment's
objective (resolution shift, guidance, caption dropout, loss weighting), under the precision context Lightning
enters, then backward, gradient clipping and the configured optimizer.

Models get random weights (Linear weights ~ N(0, std^2), std 0.02 as in FLUX.1-dev's blocks), so nothing needs
downloading. :func:`materialise_` fills a model built on the meta device one block at a time, writing fp8
Linears straight into fp8, so neither host nor device ever holds a float copy of the whole model.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from flux_lora import sampling as S
from flux_lora.config import LoraConfig, TrainConfig, load_config
from flux_lora.lora.peft_adapters import inject_lora, trainable_parameters
from flux_lora.model.flux import PRESETS, Flux, FluxParams
from flux_lora.model.fp8 import FP8Linear, default_predicate, dequantize_weight, quantize_
from flux_lora.model.layers import RMSNorm
from flux_lora.model.text_encoders import TextEmbeddings
from flux_lora.training.block_wrappers import enable_gradient_checkpointing
from flux_lora.training.loss import flow_matching_loss
from flux_lora.training.optimizers import import_class

WEIGHT_STD = 0.02
GB = 1e9
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flux-dev_lora-r16_fp8.yaml"
# d = 256 (4 heads x 64), MLP 4d, 2 double + 4 single blocks; the encoders' widths (T5 4096, CLIP 768) as in FLUX.
SMALL = replace(PRESETS["flux-dev"], hidden_size=256, num_heads=4, axes_dim=(8, 28, 28), depth=2, depth_single_blocks=4)


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
    """The known trap of fp8 training (autocast or ``weight.to(bf16)`` inside forward): fp8 storage, but
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
    """A training batch as the cache gives it: ``latents [B, C, h, w]``, T5 states ``txt [B, L, D]`` and CLIP
    ``y [B, D]`` of the model's widths, in the cache's ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    c = params.in_channels // 4
    return dict(
        latents=randn(batch, c, latent_h, latent_w),
        txt=randn(batch, n_txt, params.context_in_dim),
        y=randn(batch, params.vec_in_dim),
    )


def empty_embedding(
    params: FluxParams, n_txt: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> TextEmbeddings:
    """A stand-in for the cached empty-caption embedding (caption dropout swaps it in): random, of the widths."""
    b = make_batch(params, 2, 2, n_txt, device=device, dtype=dtype, seed=1)
    return TextEmbeddings(b["txt"], b["y"])


def image_tokens(batch: dict[str, Tensor]) -> int:
    return S.image_seq_len(*batch["latents"].shape[2:])


def shipped_train_config() -> TrainConfig:
    """The objective and optimizer of the shipped FLUX.1-dev experiment (``configs/flux-dev_lora-r16_fp8.yaml``)."""
    return load_config(SHIPPED_CONFIG).train


def precision_context(precision: str, device: str) -> AbstractContextManager:
    """What the trainer wraps a training step in for ``precision``: Lightning's own autocast for the mixed
    precisions (bf16, ``cache_enabled=False``), nothing for full precision."""
    if precision.endswith("-mixed"):
        return MixedPrecision(precision, device).forward_context()  # type: ignore[arg-type]
    return nullcontext()


def shipped_loss(
    model: Flux,
    batch: dict[str, Tensor],
    cfg: TrainConfig,
    empty: TextEmbeddings | None,
    precision: str = "bf16-mixed",
    seed: int = 0,
) -> Tensor:
    """The trainer's loss of one step (:func:`flux_lora.training.loss.flow_matching_loss`, under the trainer's
    precision context); the draws come from a generator seeded with ``seed``, so every call draws the same."""
    with precision_context(precision, batch["latents"].device.type):
        return flow_matching_loss(model, batch, cfg, torch.Generator().manual_seed(seed), empty)


def optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer the trainer builds from ``cfg`` (class by import path, learning rate, arguments)."""
    return import_class(cfg.optimizer)(trainable_parameters(model), lr=cfg.learning_rate, **cfg.optimizer_args)


def train_step(
    loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer, gradient_clip: float | None = None
) -> Tensor:
    """Forward, backward, gradient clipping by norm (as Lightning's ``gradient_clip_val``), optimizer step;
    returns the (detached) loss without a host sync."""
    loss = loss_fn()
    loss.backward()
    if gradient_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    """Drop the previous configuration's tensors and reset the peak before measuring the next (CUDA only)."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str, reserved: bool = False) -> float | None:
    """Peak CUDA memory since the last reset: allocated by tensors, or ``reserved`` by the caching allocator (what
    the GPU really gives up, fragmentation included)."""
    if not device.startswith("cuda"):
        return None
    return (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / GB


def time_steps(step: Callable[[], object], device: str, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    if not device.startswith("cuda"):
        return [_wall(step) for _ in range(steps)]
    events = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        events.append((start, end))
    sync(device)
    return [s.elapsed_time(e) / 1e3 for s, e in events]


def _wall(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


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
