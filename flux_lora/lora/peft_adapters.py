"""Adapters for training, through peft, on a float or fp8 DiT: LoRA, DoRA (peft ``use_dora``), LoKr
(``LoKrConfig``) and LoHa (``LoHaConfig``).

Targets are globs over BFL module names (``double_blocks.*``, ``*.img_attn.qkv``, ``final_layer.linear``) that
select Linear layers, optionally narrowed to some double / single blocks (``lora.double_blocks``,
``lora.single_blocks``), with per-module ranks and alphas from globs (``lora.rank_pattern``, ``lora.alpha_pattern``,
passed to peft as its rank_pattern / alpha_pattern of exact names). The default, every Linear in the double and
single blocks, is the 304 modules kohya trains on the full model, so the kohya file needs no conversion.

Adapters live in float32 even on an fp8 base: peft creates them in the base weight's dtype (fp8, which can
neither train nor run on a CPU), so each fp8 target is given ``compute_dtype = float32`` while peft builds its
adapter (the attribute peft reads for bitsandbytes layers). DoRA needs the base weight's row norms: peft reads
the weight through ``dequantize_module_weight``, which would hand it the raw fp8 bytes without their scale, so
DoRA's module gets a version that dequantizes an :class:`FP8Linear` to float32 (:func:`_dora_reads_fp8`).

The trained adapters come out (:func:`adapter_state_dict`) as the reader's canonical form
(:mod:`flux_lora.lora.patches`): a :class:`LoraWeight` per LoRA module; one full-row :class:`Patch` holding a
:class:`LoHa`, a :class:`LoKr`, or a LoRA with its DoRA magnitude ``dora_scale [out, 1]``, per module of the
other kinds, with the LyCORIS / ComfyUI scale conventions, so writing them and reading them back gives the same
layer outputs as peft's modules.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flux_lora.config import LoraConfig, block_indices
from flux_lora.lora.lycoris import kind_of
from flux_lora.lora.patches import LoHa, LoKr, ModuleChange, Patch
from flux_lora.lora.weight import LoraStateDict, LoraWeight, clean_name
from flux_lora.model.flux import Flux, FluxParams
from flux_lora.model.fp8 import FP8Linear

log = logging.getLogger(__name__)

ADAPTER = "default"
AdapterWeights = dict[str, ModuleChange]
"""Trained adapters by BFL module path: a :class:`LoraWeight`, or a one-:class:`Patch` tuple for the other kinds."""


def _block_index(name: str, family: str) -> int | None:
    m = re.match(rf"{family}\.(\d+)\.", name)
    return int(m[1]) if m else None


def select_targets(
    model: nn.Module, globs: list[str], double_blocks: list[int] | None = None, single_blocks: list[int] | None = None
) -> list[str]:
    """Names of the Linear layers matched by ``globs``, in the chosen blocks (None: all); a glob that matches none
    is an error."""
    linears = [clean_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for pattern in globs:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            near = [n for n in linears if pattern.split(".")[-1].strip("*") in n][:3] or linears[:3]
            raise ValueError(f"lora.targets entry {pattern!r} matches no Linear layer; e.g. {near}")
        chosen += [n for n in hits if n not in chosen]
    for family, keep in (("double_blocks", double_blocks), ("single_blocks", single_blocks)):
        if keep is not None:
            chosen = [n for n in chosen if (i := _block_index(n, family)) is None or i in keep]
    if not chosen:
        raise ValueError(f"lora.targets {globs} select no Linear in the chosen blocks")
    return chosen


def check_blocks(cfg: LoraConfig, depth: int, depth_single_blocks: int) -> tuple[list[int] | None, list[int] | None]:
    """``lora.double_blocks`` / ``lora.single_blocks`` as indices, checked against the model's depths (ValueError
    naming the value)."""
    return (
        block_indices(cfg.double_blocks, "lora.double_blocks", depth),
        block_indices(cfg.single_blocks, "lora.single_blocks", depth_single_blocks),
    )


def module_patterns(targets: list[str], cfg: LoraConfig) -> tuple[dict[str, int], dict[str, float]]:
    """``(rank by module, alpha by module)`` for the targets that ``lora.rank_pattern`` / ``alpha_pattern`` give
    other values than ``rank`` / ``alpha`` (first matching glob wins); a glob matching no target is an error."""
    out: list[dict[str, Any]] = []
    for key, pattern in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        values: dict[str, Any] = {}
        for glob, value in pattern.items():
            hits = [n for n in targets if fnmatch.fnmatchcase(n, glob)]
            if not hits:
                raise ValueError(f"lora.{key} entry {glob!r} matches none of the {len(targets)} adapted modules")
            for n in hits:
                values.setdefault(n, int(value) if key == "rank_pattern" else float(value))
        out.append(values)
    return out[0], out[1]


def check_targets(cfg: LoraConfig, params: FluxParams) -> list[str]:
    """The modules ``cfg`` adapts on a model of ``params``, found on the meta device:
    bad block indices, targets or patterns raise ValueError naming the value before any weight loads."""
    with torch.device("meta"):
        model = Flux(params)
    targets = select_targets(model, cfg.targets, *check_blocks(cfg, params.depth, params.depth_single_blocks))
    module_patterns(targets, cfg)
    return targets


def _peft_config(cfg: LoraConfig, targets: list[str]) -> Any:
    import peft

    ranks, alphas = module_patterns(targets, cfg)
    common: dict[str, Any] = {
        "r": cfg.rank,
        "target_modules": targets,
        # exact names, escaped: peft matches pattern keys as regular expressions against name suffixes
        "rank_pattern": {re.escape(n): r for n, r in ranks.items()},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items()},
    }
    if cfg.kind in ("lora", "dora"):
        return peft.LoraConfig(
            lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # typed int in peft, used as alpha / r in float
            lora_dropout=cfg.dropout,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.kind == "dora",
            init_lora_weights=True if cfg.init == "default" else "gaussian",
            **common,
        )
    if cfg.kind == "loha":
        return peft.LoHaConfig(alpha=cfg.alpha, module_dropout=cfg.dropout, **common)  # type: ignore[arg-type]
    return peft.LoKrConfig(
        alpha=cfg.alpha,  # type: ignore[arg-type]
        module_dropout=cfg.dropout,
        decompose_factor=cfg.lokr_factor,
        decompose_both=cfg.decompose_both,
        **common,
    )


def inject_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target Linears of ``model`` in peft adapters of ``cfg.kind`` (float32); freeze everything else.

    Returns:
        The BFL names of the wrapped modules.
    """
    import peft

    params = getattr(model, "params", None)
    blocks = check_blocks(cfg, params.depth, params.depth_single_blocks) if params is not None else (None, None)
    targets = select_targets(model, cfg.targets, *blocks)
    peft_cfg = _peft_config(cfg, targets)
    if cfg.kind == "dora":
        _dora_reads_fp8()
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for m in fp8:
        m.compute_dtype = torch.float32  # type: ignore[assignment]  # peft creates adapters in this dtype (as bnb's)
    try:
        model.requires_grad_(False)
        peft.inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    finally:
        for m in fp8:
            delattr(m, "compute_dtype")
    for layer in adapter_layers(model).values():
        for p in _adapter_parameters(layer):
            p.data = p.data.float()
            p.requires_grad_(True)
    log.info(
        "%s rank %d on %d modules (%s trainable parameters)",
        cfg.kind,
        cfg.rank,
        len(targets),
        f"{sum(p.numel() for p in trainable_parameters(model)):,}",
    )
    return targets


def _adapter_parameters(layer: Any) -> list[nn.Parameter]:
    """The parameters of the ``default`` adapter of a peft layer (LoRA A/B, DoRA magnitude, hada_*, lokr_*)."""
    out = []
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr, None)
        if isinstance(holder, nn.ModuleDict | nn.ParameterDict) and ADAPTER in holder:
            item = holder[ADAPTER]
            out += list(item.parameters()) if isinstance(item, nn.Module) else [item]
    return out


def _dora_reads_fp8() -> None:
    """Make peft's DoRA read an :class:`FP8Linear`'s weight dequantized (float32), not as its raw fp8 bytes.

    peft's DoRA module takes the base weight from ``peft.utils.integrations.dequantize_module_weight``, which knows
    bitsandbytes, HQQ and torchao but returns any other weight as it is; for our fp8 layers that is the e4m3
    bytes without their per-row scale (a wrong norm, or an error on the CPU). The function is replaced in DoRA's
    module only, once, by one that dequantizes our layers and defers to peft's for everything else.
    """
    from peft.tuners.lora import dora

    original = dora.dequantize_module_weight
    if getattr(original, "_reads_fp8", False):
        return

    def dequantize_module_weight(module: nn.Module) -> Tensor:
        if isinstance(module, FP8Linear):
            return module.dequantized_weight(torch.float32)
        return original(module)

    dequantize_module_weight._reads_fp8 = True  # type: ignore[attr-defined]
    dora.dequantize_module_weight = dequantize_module_weight  # type: ignore[assignment]


def set_input_casting(model: nn.Module, enabled: bool) -> None:
    """peft casts each LoRA input to the adapter dtype (float32) and the output back. Under autocast that is wasted
    work, because autocast casts the matmul operands itself: at full size (1024 px, batch 1) about 419 GB of memory
    traffic and 4,864 extra ops per training step, for bit-identical results (benchmarks/RESULTS.md). Turn it off
    when the step runs under autocast, keep it on otherwise (a bf16 input against float32 adapters needs it). DoRA
    layers keep it on whatever ``enabled``: there the input's dtype is the dtype peft sums ``W + s B A`` in for the
    magnitude's norm, which must be float32."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            # torch's stubs allow only tensors and modules as attributes; any value works at run time
            module.cast_input_dtype_enabled = enabled or any(getattr(module, "use_dora", {}).values())  # type: ignore[assignment]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_layers(model: nn.Module) -> dict[str, Any]:
    """BFL module name -> peft adapter layer (LoRA / DoRA, LoHa or LoKr) holding the ``default`` adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        clean_name(n): m
        for n, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and any(ADAPTER in getattr(m, a, {}) for a in m.adapter_layer_names)
    }


lora_layers = adapter_layers


def _d(t: Tensor) -> Tensor:
    return t.detach().clone()


def _lokr_factor(layer: Any, n: int) -> Tensor | tuple[Tensor, Tensor]:
    full = getattr(layer, f"lokr_w{n}")
    if ADAPTER in full:
        return _d(full[ADAPTER])
    return _d(getattr(layer, f"lokr_w{n}_a")[ADAPTER]), _d(getattr(layer, f"lokr_w{n}_b")[ADAPTER])


def _lokr_rank(w1: Tensor | tuple[Tensor, Tensor], w2: Tensor | tuple[Tensor, Tensor]) -> int | None:
    """The rank LyCORIS / ComfyUI divide alpha by: the decomposed w2's, else the decomposed w1's; None if neither."""
    for w in (w2, w1):
        if isinstance(w, tuple):
            return w[1].shape[0]
    return None


def adapter_change(layer: Any) -> ModuleChange:
    """One peft layer's ``default`` adapter in the reader's canonical form (see the module's docstring).

    Scales: peft's LoHa and LoKr scale by alpha / r as LyCORIS does, except a LoKr whose two factors are both full
    matrices (no rank): ComfyUI applies those at scale 1, so peft's alpha / r is multiplied into ``w1`` and alpha
    left out. DoRA's magnitude is peft's ``lora_magnitude_vector`` ([out]) as ``dora_scale [out, 1]``: the
    layer's weight is ``m * (W + s B A) / ||W + s B A||`` per output row in both.
    """
    scale = float(layer.scaling[ADAPTER])
    if hasattr(layer, "hada_w1_a"):
        w1a, w1b, w2a, w2b = (_d(getattr(layer, f"hada_w{k}")[ADAPTER]) for k in ("1_a", "1_b", "2_a", "2_b"))
        return (Patch(0, w1a.shape[0], LoHa(w1a, w1b, w2a, w2b, scale * w1b.shape[0])),)
    if hasattr(layer, "lokr_w1"):
        w1, w2 = _lokr_factor(layer, 1), _lokr_factor(layer, 2)
        rank = _lokr_rank(w1, w2)
        kr = LoKr(w1 * scale, w2, None) if rank is None else LoKr(w1, w2, scale * rank)  # type: ignore[operator]
        return (Patch(0, kr.shape()[0], kr),)
    down = _d(layer.lora_A[ADAPTER].weight)
    lw = LoraWeight(down=down, up=_d(layer.lora_B[ADAPTER].weight), alpha=scale * down.shape[0])
    if not layer.use_dora.get(ADAPTER, False):
        return lw
    m = _d(layer.lora_magnitude_vector[ADAPTER].weight).reshape(-1, 1)
    return (Patch(0, lw.up.shape[0], lw, dora_scale=m),)


def adapter_state_dict(model: nn.Module) -> AdapterWeights:
    """The trained adapters in the reader's canonical form (``alpha`` = scale * rank, so rsLoRA keeps its scale)."""
    return {name: adapter_change(layer) for name, layer in adapter_layers(model).items()}


def lora_state_dict(model: nn.Module) -> LoraStateDict:
    """The trained LoRA adapters (plain LoRA only; other kinds: :func:`adapter_state_dict`)."""
    out = adapter_state_dict(model)
    if not all(isinstance(w, LoraWeight) for w in out.values()):
        raise ValueError("the model's adapters are not plain LoRAs: use adapter_state_dict")
    return out  # type: ignore[return-value]


def _layer_kind(layer: Any) -> str:
    if hasattr(layer, "hada_w1_a"):
        return "loha"
    if hasattr(layer, "lokr_w1"):
        return "lokr"
    return "dora" if layer.use_dora.get(ADAPTER, False) else "lora"


def _copy(name: str, dst: Tensor, src: Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"module {name!r}: a tensor of shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


@torch.no_grad()
def load_adapter_weights(model: nn.Module, weights: Mapping[str, ModuleChange]) -> None:
    """Copy ``weights`` (as :func:`adapter_state_dict` gives them, or ``read_lora`` reads them) into the injected
    adapters: same modules, kind, shapes and (LoRA, DoRA) scales; used to continue training.

    LoHa and LoKr files of another alpha are loaded exactly by folding the ratio of the scales into ``w1``.
    """
    layers = adapter_layers(model)
    missing, extra = sorted(set(layers) - set(weights)), sorted(set(weights) - set(layers))
    if missing or extra:
        raise ValueError(f"LoRA modules do not match the model's adapters: missing {missing[:3]}, extra {extra[:3]}")
    for name, change in weights.items():
        layer, have, want = layers[name], kind_of(change), _layer_kind(layers[name])
        if have != want:
            raise ValueError(f"module {name!r} holds {have}, the adapters being trained are {want} (lora.kind)")
        scale = float(layer.scaling[ADAPTER])
        if have in ("lora", "dora"):
            lw = change if isinstance(change, LoraWeight) else change[0].weight
            assert isinstance(lw, LoraWeight)
            if not math.isclose(lw.scale, scale, rel_tol=1e-6):
                raise ValueError(
                    f"LoRA module {name!r}: scale {lw.scale} differs from the configured {scale} (alpha/rank)"
                )
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if a.shape != lw.down.shape or b.shape != lw.up.shape:
                raise ValueError(
                    f"LoRA module {name!r}: shapes {tuple(lw.down.shape)}/{tuple(lw.up.shape)} do not fit "
                    f"the adapters {tuple(a.shape)}/{tuple(b.shape)}"
                )
            a.copy_(lw.down)
            b.copy_(lw.up)
            if have == "dora":
                m = change[0].dora_scale  # type: ignore[index]
                assert m is not None, "a DoRA change holds its magnitude"
                _copy(name, layer.lora_magnitude_vector[ADAPTER].weight, m.reshape(-1))
            continue
        w = change[0].weight  # type: ignore[index]
        if isinstance(w, LoHa):
            ratio = (1.0 if w.alpha is None else w.alpha / w.w1b.shape[0]) / scale
            for key, t in (("1_a", w.w1a * ratio), ("1_b", w.w1b), ("2_a", w.w2a), ("2_b", w.w2b)):
                _copy(name, getattr(layer, f"hada_w{key}")[ADAPTER], t)
            continue
        assert isinstance(w, LoKr)
        rank = _lokr_rank(w.w1, w.w2)
        ratio = (1.0 if w.alpha is None or rank is None else w.alpha / rank) / scale
        for n, f in ((1, w.w1), (2, w.w2)):
            full = getattr(layer, f"lokr_w{n}")
            if isinstance(f, tuple) != (ADAPTER not in full):
                raise ValueError(f"LoKr module {name!r}: factor w{n} is decomposed in one and full in the other")
            k = ratio if n == 1 else 1.0
            if isinstance(f, tuple):
                _copy(name, getattr(layer, f"lokr_w{n}_a")[ADAPTER], f[0] * k)
                _copy(name, getattr(layer, f"lokr_w{n}_b")[ADAPTER], f[1])
            else:
                _copy(name, full[ADAPTER], f * k)


load_lora_weights = load_adapter_weights


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
