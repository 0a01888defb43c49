"""LoRA adapters for training, through peft, on a float or fp8 DiT.

Targets are globs over BFL module names (``double_blocks.*``, ``*.img_attn.qkv``, ``final_layer.linear``) that
select Linear layers. The default, every Linear in the double and single blocks, is the 304 modules kohya trains
on the full model, so the kohya file needs no conversion. Adapters live in float32 even on an fp8 base (peft would
create them in the base weight's dtype, fp8, which can neither train nor run on a CPU).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from flux_lora.config import LoraConfig
from flux_lora.lora.weight import LoraStateDict, LoraWeight, clean_name

log = logging.getLogger(__name__)

ADAPTER = "default"


def select_targets(model: nn.Module, globs: list[str]) -> list[str]:
    """Names of the Linear layers matched by ``globs``; a glob that matches none is an error."""
    linears = [clean_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for pattern in globs:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            near = [n for n in linears if pattern.split(".")[-1].strip("*") in n][:3] or linears[:3]
            raise ValueError(f"lora.targets entry {pattern!r} matches no Linear layer; e.g. {near}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def inject_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target Linears of ``model`` in peft LoRA layers (float32 adapters); freeze everything else.

    Returns:
        The BFL names of the wrapped modules.
    """
    import peft

    targets = select_targets(model, cfg.targets)
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # typed int in peft, used as alpha / r in float
        lora_dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        init_lora_weights=True if cfg.init == "default" else "gaussian",
        target_modules=targets,
    )
    model.requires_grad_(False)
    peft.inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    log.info(
        "LoRA rank %d on %d modules (%s trainable parameters)",
        cfg.rank,
        len(targets),
        f"{sum(p.numel() for p in trainable_parameters(model)):,}",
    )
    return targets


def set_input_casting(model: nn.Module, enabled: bool) -> None:
    """peft casts each LoRA input to the adapter dtype (float32) and the output back. Under autocast that is wasted
    work, because autocast casts the matmul operands itself: at full size about 184 GB of memory traffic and 1,672
    extra kernels per step, for bit-identical results. Turn it off when the step runs under autocast, keep it on
    otherwise (a bf16 input against float32 adapters needs it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BFL module name -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_state_dict(model: nn.Module) -> LoraStateDict:
    """The trained adapters in the canonical form (``alpha`` = scale * rank, so rsLoRA keeps its scale)."""
    out: LoraStateDict = {}
    for name, layer in lora_layers(model).items():
        down = layer.lora_A[ADAPTER].weight.detach()
        out[name] = LoraWeight(
            down=down.clone(),
            up=layer.lora_B[ADAPTER].weight.detach().clone(),
            alpha=float(layer.scaling[ADAPTER]) * down.shape[0],
        )
    return out


@torch.no_grad()
def load_lora_weights(model: nn.Module, lora: LoraStateDict) -> None:
    """Copy ``lora`` into the injected adapters (same modules, ranks and scales); used to continue training."""
    layers = lora_layers(model)
    missing, extra = sorted(set(layers) - set(lora)), sorted(set(lora) - set(layers))
    if missing or extra:
        raise ValueError(f"LoRA modules do not match the model's adapters: missing {missing[:3]}, extra {extra[:3]}")
    for name, w in lora.items():
        layer = layers[name]
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if a.shape != w.down.shape or b.shape != w.up.shape:
            raise ValueError(
                f"LoRA module {name!r}: shapes {tuple(w.down.shape)}/{tuple(w.up.shape)} do not fit "
                f"the adapters {tuple(a.shape)}/{tuple(b.shape)}"
            )
        if not math.isclose(w.scale, float(layer.scaling[ADAPTER]), rel_tol=1e-6):
            raise ValueError(
                f"LoRA module {name!r}: scale {w.scale} differs from the configured "
                f"{float(layer.scaling[ADAPTER])} (alpha/rank)"
            )
        a.copy_(w.down)
        b.copy_(w.up)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` computes as its frozen base: every enabled peft adapter layer is switched off (peft's own
    ``enable_adapters``, as its ``disable_adapter`` context does) and switched back on after, with each adapter
    parameter's ``requires_grad`` as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)
