"""Random-weight models for ``bench_gpu.py``: our fp8 DiT with LoRA, the diffusers peer setup, and the text
encoders and autoencoder at any size. Everything is built on the meta device and materialised block by block on
the target device (see :func:`benchmarks.common.materialise_`), so host memory stays small."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

from benchmarks.common import clip_l_config, materialise_, precision_context, random_dit, t5_xxl_config
from flux_lora.config import LoraConfig, TrainConfig
from flux_lora.lora.peft_adapters import inject_lora, set_input_casting
from flux_lora.model.autoencoder import AE_PRESETS, AutoEncoder
from flux_lora.model.flux import FluxParams
from flux_lora.model.fp8 import set_fp8_matmul
from flux_lora.model.text_encoders import TextEmbeddings, TextEncoders
from flux_lora.training.block_wrappers import compile_blocks, enable_gradient_checkpointing
from flux_lora.training.loss import dit_inputs, draw, weighted_mse
from flux_lora.weights.keymaps import flux_to_diffusers_config

BLOCK_LISTS = (
    "double_blocks",
    "single_blocks",
    "transformer_blocks",
    "single_transformer_blocks",
    "encoder.block",
    "text_model.encoder.layers",
)


def ours(
    params: FluxParams,
    device: str,
    *,
    rank: int,
    checkpointing: bool,
    compiled: bool,
    fp8_matmul: bool = False,
    selective: bool = False,
) -> nn.Module:
    """Our training setup: block Linears in fp8 (per-channel scales), float32 LoRA on the block Linears, no peft
    input cast (the step runs under autocast), optionally fp8 GEMMs and selective checkpointing."""
    model = random_dit(params, device=device, quantize="blocks")
    inject_lora(model, LoraConfig(rank=rank, alpha=rank))
    set_input_casting(model, False)
    if fp8_matmul:
        set_fp8_matmul(model)
    if checkpointing:
        enable_gradient_checkpointing(model, selective=selective)
    if compiled:
        compile_blocks(model)
    return model.train()


def peer(
    params: FluxParams, device: str, *, rank: int, checkpointing: bool, compiled: bool, fp8: bool = True
) -> nn.Module:
    """The nearest peer: diffusers' FluxTransformer2DModel, ``enable_layerwise_casting`` (fp8 storage, bf16
    compute; diffusers skips norms and modulation; bf16 storage without ``fp8``), peft LoRA of ``rank`` on every
    Linear of the blocks (float32 adapters, as ours), diffusers' own gradient checkpointing and
    ``compile_repeated_blocks``."""
    import peft
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux_to_diffusers_config(params)).to(torch.bfloat16)
    if fp8:
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    materialise_(model, device, chunks=_chunks(model))
    targets = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
    ]
    model.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
        if ".lora_" in name:
            p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    if compiled:
        model.compile_repeated_blocks()
    return model.train()


def peer_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    cfg: TrainConfig,
    empty: TextEmbeddings | None,
    precision: str = "bf16-mixed",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Our training loss (:mod:`flux_lora.training.loss`: the same draws, inputs and weighting) computed by the
    diffusers model, under the same precision context; the noisy image goes in as ``dtype``."""
    draws = draw(batch["latents"].shape, cfg, torch.Generator().manual_seed(seed))
    guidance = cfg.guidance if model.config.guidance_embeds else None
    with precision_context(precision, batch["latents"].device.type):
        x, target = dit_inputs(batch, draws, guidance, dtype, empty)
        pred = model(**peer_inputs(x))[0]
        return weighted_mse(pred, target, draws.t.to(target.device), cfg.loss_weighting)


def peer_inputs(x: dict) -> dict:
    """Our DiT's keyword arguments as diffusers' (it scales times and guidance by 1000 itself)."""
    return dict(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
        return_dict=False,
    )


def _chunks(model: nn.Module) -> list[nn.Module]:
    """Top-level children, with every list of repeated blocks expanded into its blocks."""
    lists = {id(model.get_submodule(n)) for n in BLOCK_LISTS if _has(model, n)}
    out: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in lists:
                out.extend(child)
            elif any(id(m) in lists for m in child.modules()):
                walk(child)
            else:
                out.append(child)

    if any(p is not None for p in model._parameters.values()):
        raise ValueError(f"{type(model).__name__} holds parameters outside its children; chunk it explicitly")
    walk(model)
    return out


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


class FixedTokenizer:
    """Stands in for a tokenizer: every prompt becomes ``length`` token ids (the encoders' cost does not depend
    on the ids, and the benchmark needs no vocabulary files)."""

    def __init__(self, token: int = 1):
        self.token = token

    def __call__(self, prompts: list[str], *, max_length: int = 1, **kwargs) -> SimpleNamespace:
        # without max_length (the cache counting each caption's tokens, untruncated) a prompt is one token
        return SimpleNamespace(input_ids=torch.full((len(prompts), max_length), self.token, dtype=torch.long))


def text_encoders(params: FluxParams, device: str, *, full_size: bool = True):
    """CLIP-L and T5-XXL (or one-layer versions of the DiT's widths) with random bf16 weights on ``device``,
    wrapped as :class:`flux_lora.model.text_encoders.TextEncoders`."""
    from transformers import CLIPTextModel, T5EncoderModel

    small = {} if full_size else dict(num_hidden_layers=1, intermediate_size=64, num_attention_heads=2)
    clip_cfg = clip_l_config(hidden_size=params.vec_in_dim, projection_dim=params.vec_in_dim, **small)
    t5_small = {} if full_size else dict(num_layers=1, d_ff=64, num_heads=2, d_kv=8)
    t5_cfg = t5_xxl_config(d_model=params.context_in_dim, **t5_small)
    with torch.device("meta"):
        clip, t5 = CLIPTextModel(clip_cfg).to(torch.bfloat16), T5EncoderModel(t5_cfg).to(torch.bfloat16)
    for m in (clip, t5):
        materialise_(m, device, chunks=_chunks(m))
    for name, buf in list(clip.named_buffers()):  # CLIP's one buffer, which to_empty leaves uninitialised
        owner, _, attr = name.rpartition(".")
        assert attr == "position_ids", name
        setattr(clip.get_submodule(owner), attr, torch.arange(buf.shape[-1], device=device).expand(1, -1))
    return TextEncoders(clip, FixedTokenizer(clip_cfg.eos_token_id), t5, FixedTokenizer(1), params.max_sequence_length)


def autoencoder(device: str, preset: str = "flux") -> AutoEncoder:
    with torch.device("meta"):
        ae = AutoEncoder(AE_PRESETS[preset]).to(torch.bfloat16)
    return materialise_(ae, device, chunks=[ae]).eval()
