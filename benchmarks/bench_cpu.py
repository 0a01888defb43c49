"""CPU benchmark: deterministic counts and bytes of LoRA training on a scaled-down FLUX of the real structure.

    python benchmarks/bench_cpu.py [--out FILE.json] [--timing]

Prints one JSON object (sections B1-B9). Nothing here depends on the CPU's speed, except the optional
``--timing`` section (B5, B8), which is never asserted. ``tests/test_benchmarks.py`` runs the same functions and
asserts their bounds. Every step is the trainer's (:func:`benchmarks.common.shipped_loss`): the flow-matching loss
of the shipped FLUX.1-dev experiment.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks import accounting as A
from benchmarks.common import (
    GB,
    SHIPPED_CONFIG,
    SMALL,
    clip_l_config,
    empty_embedding,
    image_tokens,
    make_batch,
    optimizer,
    random_dit,
    relative_error,
    shipped_loss,
    shipped_train_config,
    t5_xxl_config,
    train_step,
    variant,
)
from benchmarks.measure import count_flops, count_ops, held_for_backward, module_calls
from flux_lora.atomic import write_text_atomic
from flux_lora.model.autoencoder import AE_PRESETS, AutoEncoder
from flux_lora.model.flux import PRESETS, Flux, FluxParams
from flux_lora.model.fp8 import FP8Linear, default_predicate, quantize_, storage_bytes
from flux_lora.model.text_encoders import TextEmbeddings
from flux_lora.training.loss import dit_inputs, draw

CFG = shipped_train_config()
LATENT = 32  # 32 x 32 latent -> 16 x 16 packed = 256 image tokens
N_TXT = 32
RANK = 16
POLICIES = ("blocks", "all")


@functools.cache
def _empty(dtype: torch.dtype) -> TextEmbeddings:
    return empty_embedding(SMALL, N_TXT, dtype=dtype)


def small_batch(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """A cached batch; its empty caption (for caption dropout) is made with it, before anything is measured."""
    _empty(dtype)
    return make_batch(SMALL, LATENT, LATENT, N_TXT, dtype=dtype, seed=seed)


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The trainer's step loss. bf16 batches run as Lightning's bf16-mixed; float32 ones as 32-true, which the
    count-only sections (FLOPs, parameters, module calls) use because bf16 matmuls are slow on CPUs."""
    dtype = batch["txt"].dtype
    precision = "bf16-mixed" if dtype == torch.bfloat16 else "32-true"
    return shipped_loss(model, batch, CFG, _empty(dtype), precision)


# ---------------------------------------------------------------- B1: storage


def _meta_dit(p: FluxParams, policy: str | None) -> Flux:
    with torch.device("meta"):
        model = Flux(p).to(torch.bfloat16)
    return quantize_(model, default_predicate(policy)) if policy else model


def _expected_fp8_bytes(p: FluxParams, policy: str, n_params: int) -> int:
    """The same accounting in closed form: 2 bytes per parameter (bf16), except 1 byte per weight of an fp8
    Linear plus a float32 scale per output channel."""
    fp8 = [s for s in A.dit_linears(p) if policy == "all" or s.name.startswith(("double_", "single_"))]
    return 2 * n_params - sum(s.weights for s in fp8) + 4 * sum(s.out_features for s in fp8)


def kept_float(model: nn.Module) -> list[str]:
    """Linears a quantized model left in bf16 (block indices collapsed); biases and norm scales are bf16."""
    names = {re.sub(r"\.\d+\.", ".*.", n) for n, m in model.named_modules() if type(m) is nn.Linear}
    return sorted(names) + ["every bias and RMSNorm scale (bf16)", "fp8 per-output-channel scales (float32)"]


def storage(base: Flux) -> dict:
    """B1: bytes of the fp8 DiT over the bf16 one, measured on ``base`` (bf16) and at full size on meta."""
    full = PRESETS["flux-dev"]
    n_small, n_full = (sum(t.numel() for t in m.parameters()) for m in (base, _meta_dit(full, None)))
    out: dict = {"small": {"bf16_bytes": storage_bytes(base)}, "full_flux_dev": {"bf16_GB": 2 * n_full / GB}}
    for policy in POLICIES:
        small = storage_bytes(quantize_(copy.deepcopy(base), default_predicate(policy)))
        out["small"][policy] = dict(
            bytes=small,
            ratio=small / out["small"]["bf16_bytes"],
            closed_form_bytes=_expected_fp8_bytes(SMALL, policy, n_small),
        )
        model = _meta_dit(full, policy)
        fp8 = storage_bytes(model)
        out["full_flux_dev"][policy] = dict(
            GB=fp8 / GB,
            ratio=fp8 / GB / out["full_flux_dev"]["bf16_GB"],
            closed_form_GB=_expected_fp8_bytes(full, policy, n_full) / GB,
            kept_in_bf16=kept_float(model),
        )
    return out


# ---------------------------------------------------------------- B2: bytes held for backward


def held_bytes(base: Flux, batch: dict) -> dict:
    """B2: activation bytes of a LoRA step for a bf16 base, our fp8 base and a naive fp8 cast (control), with and
    without gradient checkpointing."""
    out: dict = {}
    for ckpt in (False, True):
        row = {}
        for kind in ("bf16", "fp8", "fp8_naive"):
            model = variant(base, kind, rank=RANK, checkpointing=ckpt)
            row[kind] = held_for_backward(model, lambda m=model: loss(m, batch))
        out["checkpointing" if ckpt else "no_checkpointing"] = row
    tokens = image_tokens(batch) + batch["txt"].shape[1]
    blocks = SMALL.depth + SMALL.depth_single_blocks
    out["bf16_elements_per_token_per_block_in_d"] = out["no_checkpointing"]["bf16"]["held"] / (
        2 * SMALL.hidden_size * tokens * blocks
    )
    out["naive_minus_bf16_bytes"] = (
        out["no_checkpointing"]["fp8_naive"]["held"] - out["no_checkpointing"]["bf16"]["held"]
    )
    return out


# ---------------------------------------------------------------- B3: FLOPs


def flop_ratios(base: Flux, batch: dict) -> dict:
    """B3: FLOPs of a training step (forward + backward) over a forward pass, fp8 base, LoRA rank 16; the control
    lets the frozen base compute weight gradients too (what a requires_grad leak costs). FLOPs do not depend on
    the dtype: a float32 ``base`` and ``batch`` count the same, faster."""
    n_img, n_txt = image_tokens(batch), batch["txt"].shape[1]
    model = variant(base, "fp8", rank=RANK)
    fwd = count_flops(lambda: loss(model, batch))
    out = dict(
        forward=fwd["total"],
        analytic_forward=A.forward_flops(SMALL, n_img, n_txt, lora_rank=RANK)["total"],
        forward_by_op={k: v for k, v in fwd.items() if k != "total"},
    )
    for ckpt in (False, True):
        m = variant(base, "fp8", rank=RANK, checkpointing=ckpt)
        step = count_flops(lambda m=m: loss(m, batch).backward())["total"]
        key = "checkpointing" if ckpt else "no_checkpointing"
        out[key] = dict(
            step=step,
            ratio=step / fwd["total"],
            analytic_ratio=A.step_flops(SMALL, n_img, n_txt, checkpointing=ckpt, lora_rank=RANK)
            / out["analytic_forward"],
        )
    leak = variant(base, "bf16", rank=RANK).requires_grad_(True)  # "bf16": the base as it is
    out["control_base_weight_grads_ratio"] = count_flops(lambda: loss(leak, batch).backward())["total"] / fwd["total"]
    full, (n_img, n_txt) = PRESETS["flux-dev"], A.tokens(1024, 1024, 512)
    f = A.forward_flops(full, n_img, n_txt, lora_rank=RANK)["total"]
    out["full_flux_dev_1024px"] = dict(
        forward_TFLOP=f / 1e12,
        **{
            k: A.step_flops(full, n_img, n_txt, checkpointing=c, lora_rank=RANK) / f
            for k, c in (("ratio_no_checkpointing", False), ("ratio_checkpointing", True))
        },
    )
    return out


# ---------------------------------------------------------------- B4: trainable parameters and optimizer state


def trainable_audit(base: Flux, batch: dict) -> dict:
    """B4: after one step, which parameters got gradients, and how much AdamW state they need."""
    model = variant(base, "fp8", rank=RANK)
    opt = optimizer(model, CFG)
    loss(model, batch).backward()
    named = dict(model.named_parameters())
    with_grad = [n for n, p in named.items() if p.grad is not None]
    opt.step()
    moments = sum(
        v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")
    )
    n_train = sum(p.numel() for p in named.values() if p.requires_grad)
    full = PRESETS["flux-dev"]
    return dict(
        trainable=n_train,
        with_grad=sum(named[n].numel() for n in with_grad),
        only_lora=all(".lora_" in n for n in with_grad),
        analytic=A.lora_parameter_count(SMALL, RANK),
        adamw_moment_bytes=moments,
        full_flux_dev_rank16=dict(
            targets=len(A.lora_targets(full)),
            params=A.lora_parameter_count(full, RANK),
            token_path_params=A.lora_parameter_count(full, RANK, rows=("img", "txt", "all")),
            weights_grads_adamw_GB=16 * A.lora_parameter_count(full, RANK) / GB,
        ),
    )


# ---------------------------------------------------------------- B6: op counts


def op_counts(base: Flux, batch: dict) -> dict:
    """B6: aten ops (about the kernels an eager GPU step launches) of forward + backward, bf16 vs fp8 base."""
    out = {}
    for kind in ("bf16", "fp8"):
        model = variant(base, kind, rank=RANK)
        out[kind] = count_ops(lambda m=model: loss(m, batch).backward())
    n_fp8 = sum(isinstance(m, FP8Linear) for m in variant(base, "fp8").modules())
    out["fp8_linears"] = n_fp8
    out["fp8_extra_kernels_per_linear"] = (out["fp8"]["kernels"] - out["bf16"]["kernels"]) / n_fp8
    return out


# ---------------------------------------------------------------- B7: encoders stay out of a cached step


def tiny_encoders(p: FluxParams, seed: int = 0) -> dict[str, nn.Module]:
    """CLIP and T5 encoders (transformers) of the DiT's widths and one layer each, and the tiny autoencoder."""
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(
        clip_l_config(
            vocab_size=100,
            hidden_size=p.vec_in_dim,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=p.vec_in_dim,
            bos_token_id=97,
            eos_token_id=98,
            pad_token_id=99,
        )
    )
    t5 = T5EncoderModel(
        t5_xxl_config(
            vocab_size=100,
            d_model=p.context_in_dim,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    )
    return dict(clip=clip.eval(), t5=t5.eval(), ae=AutoEncoder(AE_PRESETS["tiny"]).eval())


@torch.no_grad()
def encode_batch(enc: dict[str, nn.Module], n_txt: int, pixels: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """What an uncached step computes: T5 states, CLIP pooled vector and latents, from token ids and pixels."""
    g = torch.Generator().manual_seed(seed)
    clip_ids = torch.randint(0, 97, (1, 77), generator=g)
    clip_ids[:, -1] = 98
    t5_ids = torch.randint(2, 100, (1, n_txt), generator=g)
    return dict(
        latents=enc["ae"].encode(torch.rand(1, 3, pixels, pixels, generator=g) * 2 - 1).to(dtype),
        txt=enc["t5"](input_ids=t5_ids).last_hidden_state.to(dtype),
        y=enc["clip"](input_ids=clip_ids).pooler_output.to(dtype),
    )


def encoder_work(model: nn.Module, batch: dict, step_from_ids=None) -> dict:
    """B7: encoder module calls inside a training step with cached embeddings (must be 0) and, as the control,
    inside a step that encodes its inputs; plus the encoders' full-size FLOPs next to a full-size step."""
    enc = tiny_encoders(SMALL)
    opt = optimizer(model, CFG)
    with module_calls(enc.values()) as cached:
        train_step(lambda: loss(model, batch), opt, CFG.gradient_clip)
    pixels = LATENT * AE_PRESETS["tiny"].downscale_factor
    with module_calls(enc.values()) as uncached:
        train_step(lambda: loss(model, encode_batch(enc, N_TXT, pixels, batch["txt"].dtype)), opt, CFG.gradient_clip)
    return dict(
        cached_step_encoder_calls=cached[0],
        uncached_step_encoder_calls=uncached[0],
        full_size_share=full_size_encoder_share(),
    )


def full_size_encoder_share() -> dict:
    """T5-XXL (512 tokens), CLIP-L (77) and the AE encoder, FLOPs counted on the meta device, against the
    analytic FLOPs of a checkpointed rank-16 LoRA step of FLUX.1-dev at 512 and 1024 px."""
    from transformers import CLIPTextModel, T5EncoderModel

    with torch.device("meta"):
        t5, clip, ae = T5EncoderModel(t5_xxl_config()), CLIPTextModel(clip_l_config()), AutoEncoder(AE_PRESETS["flux"])
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    out = dict(
        t5_TFLOP=count_flops(lambda: t5(input_ids=ids))["total"] / 1e12,
        clip_TFLOP=count_flops(lambda: clip(input_ids=ids[:, :77]))["total"] / 1e12,
        t5_bf16_GB=2 * sum(p.numel() for p in t5.parameters()) / GB,
    )
    full = PRESETS["flux-dev"]
    for px in (512, 1024):
        x = torch.zeros(1, 3, px, px, device="meta")
        ae_flops = count_flops(lambda x=x: ae.encode(x))["total"]
        step = A.step_flops(full, *A.tokens(px, px, 512), checkpointing=True, lora_rank=RANK)
        out[f"{px}px"] = dict(
            ae_encoder_TFLOP=ae_flops / 1e12,
            step_TFLOP=step / 1e12,
            t5_share_of_step=out["t5_TFLOP"] * 1e12 / step,
            ae_share_of_step=ae_flops / step,
        )
    return out


# ---------------------------------------------------------------- B9: fp8 output error


@torch.no_grad()
def fp8_error(base: Flux, batch: dict) -> dict:
    """B9: relative output error against the bf16 model (same weights, bf16 compute) of fp8 per-channel-scaled
    and plain-cast storage, per policy; and fp8 storage against bf16 compute on the dequantized weights."""
    draws = draw(batch["latents"].shape, CFG, torch.Generator().manual_seed(0))
    x, _ = dit_inputs(batch, draws, CFG.guidance, base.img_in.bias.dtype, _empty(batch["txt"].dtype))
    ref = base(**x)
    out: dict = {}
    for policy in POLICIES:
        for per_channel in (True, False):
            q = quantize_(copy.deepcopy(base), default_predicate(policy), per_channel=per_channel)
            out[f"{policy}_{'scaled' if per_channel else 'plain'}"] = relative_error(q(**x), ref)
    q = quantize_(copy.deepcopy(base), default_predicate("blocks"))
    deq = copy.deepcopy(q)
    for name, m in list(deq.named_modules()):
        if isinstance(m, FP8Linear):
            parent, _, child = name.rpartition(".")
            setattr(deq.get_submodule(parent), child, m.to_linear(torch.bfloat16))
    out["fp8_vs_bf16_on_dequantized_weights"] = relative_error(q(**x), deq(**x))
    out["one_linear"] = _linear_error()
    return out


@torch.no_grad()
def _linear_error(seed: int = 0) -> dict[str, float]:
    """The same comparison for one d -> 3d Linear with N(0, 0.02^2) weights, no residual stream to dilute it."""
    g = torch.Generator().manual_seed(seed)
    d = SMALL.hidden_size
    lin = nn.Linear(d, 3 * d).bfloat16()
    lin.weight.copy_(torch.randn(3 * d, d, generator=g) * 0.02)
    x = torch.randn(64, d, generator=g).bfloat16()
    ref = lin(x)
    return {
        ("scaled" if pc else "plain"): relative_error(FP8Linear.from_linear(lin, per_channel=pc)(x), ref)
        for pc in (True, False)
    }


# ---------------------------------------------------------------- driver


def run(timing: bool = False) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    base, batch = random_dit(SMALL), small_batch()
    base32, batch32 = random_dit(SMALL, dtype=torch.float32), small_batch(torch.float32)
    result = dict(
        config=dict(
            params={
                k: v
                for k, v in SMALL.to_dict().items()
                if k in ("hidden_size", "num_heads", "depth", "depth_single_blocks", "context_in_dim", "vec_in_dim")
            },
            image_tokens=image_tokens(batch),
            text_tokens=N_TXT,
            batch=1,
            lora_rank=RANK,
            weight_std=0.02,
            compute="B1 B2 B6 B9: bf16 weights, bf16-mixed (Lightning's autocast), float32 LoRA adapters; "
            "B3 B4 B7 (counts that do not depend on the dtype): float32",
            step=f"flow_matching_loss with train: of {SHIPPED_CONFIG.relative_to(SHIPPED_CONFIG.parents[1])}",
        ),
        B1_storage=storage(base),
        B2_held_for_backward=held_bytes(base, batch),
        B3_flops=flop_ratios(base32, batch32),
        B4_trainable=trainable_audit(base32, batch32),
        B6_ops=op_counts(base, batch),
        B7_encoders=encoder_work(variant(base32, "fp8", rank=RANK), batch32),
        B9_fp8_error=fp8_error(base, batch),
    )
    if timing:
        from benchmarks.cpu_timing import run_timing

        result["timing"] = run_timing()
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--timing", action="store_true", help="add the (never asserted) B5/B8 timing section")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the counts do not depend on "
        "it, and on a shared machine more threads can be many times slower)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = json.dumps(run(args.timing), indent=2)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
