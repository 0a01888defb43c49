"""Applying LoRAs to a loaded DiT for inference: unfused (run-time, removable) or fused into the weights.

Unfused: each targeted Linear gets a ``runtime_loras`` child holding every LoRA's ``down``/``up`` (float32 by
default, never the fp8 of an fp8 base) and a forward hook that adds ``sum_i s_i * up_i @ down_i @ x`` to its
output, with ``s_i = scale_i * alpha_i / rank_i``. Removing a LoRA deletes its tensors; removing the last one
removes the hook and the child, so the model is exactly what it was.

Patches (DoRA, LoHa, LoKr, ``.diff`` / ``.diff_b``, LoRA biases; :mod:`flux_lora.lora.patches`) are turned into
their dense change at strength 1, ``D [out, in]`` and ``db``, once when applied (DoRA from the layer's weight
then); unfused they add ``s * (D @ x + db)``, a dense ``[out, in]`` buffer per layer in the adapter dtype.

Fused: ``W += s * up @ down`` (patches: ``W += s * D``, ``b += s * db``). On an :class:`FP8Linear` the weight
is dequantized, updated in float32 and re-quantized (``FP8Linear.set_weight``), which rounds away most of a small
delta; the original fp8 tensor and scale are kept (on the CPU), so unfusing restores the original weights bit for
bit. The LoRAs of one call are summed first, so each layer is re-quantized once; calls are unfused last-in,
first-out.

peft is not used here: injecting a second adapter with ``inject_adapter_in_model`` deactivates the first one
in every layer, activating several needs a per-layer ``set_adapter`` that also makes them trainable, adapters
on an fp8 base are created in fp8, and the model's state-dict keys change while adapters are loaded. The
trainer's own peft adapters, if any, are left alone: a LoRA here targets the module at the BFL path, peft
wrapper or not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_lora.lora.patches import (
    Change,
    ModuleChange,
    NormOverride,
    Patch,
    check_patch,
    dense_change,
    input_width,
)
from flux_lora.lora.replace import Replaced, override, restore, widen
from flux_lora.lora.weight import LoraWeight
from flux_lora.model.fp8 import FP8Linear
from flux_lora.model.layers import WRAPPED

log = logging.getLogger(__name__)

LoraMode = Literal["unfused", "fused"]
LoraSpec = tuple[Mapping[str, Change], float, str]
"""``(weights, user scale, name)``; weights as :func:`flux_lora.lora.files.read_lora` returns them."""

RUNTIME_ATTR = "runtime_loras"
WIDENABLE = ("img_in",)
"""Linears a LoRA with a wider input may widen (a control LoRA's image + structure latents)."""
STATE_ATTR = "_flux_lora_adapters"


class RuntimeLoras(nn.Module):
    """The unfused LoRAs of one Linear: ``delta(x) = sum_i s_i * (x @ down_i^T) @ up_i^T``.

    The tensors are non-persistent buffers: they follow the layer through ``.to()`` and offload, but never
    enter the model's state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alpha_over_rank: dict[str, float] = {}
        self.scales: dict[str, float] = {}  # the user's scale per LoRA

    def add(self, name: str, lw: LoraWeight, scale: float, device: torch.device, dtype: torch.dtype) -> None:
        self.register_buffer(f"{name}__down", lw.down.to(device, dtype), persistent=False)
        self.register_buffer(f"{name}__up", lw.up.to(device, dtype), persistent=False)
        self.alpha_over_rank[name] = lw.scale
        self.scales[name] = scale

    def add_dense(self, name: str, delta: Tensor, bias: Tensor | None, scale: float, dtype: torch.dtype) -> None:
        """A patch as its dense change at strength 1: ``delta [out, in]`` and ``bias [out]`` (or None)."""
        self.register_buffer(f"{name}__delta", delta.to(dtype), persistent=False)
        self.register_buffer(f"{name}__bias", None if bias is None else bias.to(dtype), persistent=False)
        self.alpha_over_rank[name] = 1.0
        self.scales[name] = scale

    def drop(self, name: str) -> None:
        for part in ("down", "up", "delta", "bias"):
            self._buffers.pop(f"{name}__{part}", None)
        del self.alpha_over_rank[name], self.scales[name]

    def _delta(self, name: str, x: Tensor) -> Tensor:
        if f"{name}__delta" in self._buffers:
            delta = cast(Tensor, self._buffers[f"{name}__delta"])
            return F.linear(x.to(delta.dtype), delta, self._buffers[f"{name}__bias"])
        down, up = cast(Tensor, self._buffers[f"{name}__down"]), cast(Tensor, self._buffers[f"{name}__up"])
        return F.linear(F.linear(x.to(down.dtype), down), up)

    def forward(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        """``x [..., in]`` -> ``[..., out]`` in ``out_dtype``, computed in the adapters' dtype."""
        total: Tensor | None = None
        for name, scale in self.scales.items():
            delta = self._delta(name, x) * (scale * self.alpha_over_rank[name])
            total = delta if total is None else total + delta
        assert total is not None, "called with no LoRAs (the hook skips that)"
        return total.to(out_dtype)


def _lora_hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    runtime = getattr(module, RUNTIME_ATTR, None)
    if runtime is None or not runtime.scales:
        return output
    return output + runtime(args[0], output.dtype)


def _remove_hook(module: nn.Module) -> None:
    # Found by identity rather than through a stored handle: a handle of a deep-copied model would point at
    # the original's hook table.
    for key, fn in list(module._forward_hooks.items()):
        if fn is _lora_hook:
            del module._forward_hooks[key]


_Saved = tuple[nn.Linear, Tensor, Tensor | None, Tensor | None]
"""``(layer, weight, fp8 scale or None, bias or None)`` as they were before a fuse."""


@dataclass
class _Fused:
    """The LoRAs fused by one call, and the originals of their layers."""

    names: list[str]
    saved: list[_Saved]


@dataclass
class _State:
    unfused: dict[str, list[str]] = field(default_factory=dict)  # name -> module paths
    scales: dict[str, float] = field(default_factory=dict)  # name -> user scale
    fused: list[_Fused] = field(default_factory=list)
    replaced: dict[str, list[Replaced]] = field(default_factory=dict)  # name -> norm overrides, widened layers


def _state(model: nn.Module) -> _State:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        state = _State()
        model.__dict__[STATE_ATTR] = state
    return state


def _base_linear(module: nn.Module) -> nn.Linear:
    """The Linear holding the weight: the module itself, or the base layer of a peft wrapper."""
    get_base_layer = getattr(module, "get_base_layer", None)
    base = module if get_base_layer is None else get_base_layer()
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{type(base).__name__} is not a Linear layer")
    return base


def _submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, looking through activation-checkpoint wrappers on the way."""
    module = model
    for part in path.split("."):
        while not hasattr(module, part) and hasattr(module, WRAPPED):
            module = getattr(module, WRAPPED)
        module = getattr(module, part)
        if not isinstance(module, nn.Module):
            raise AttributeError(f"{part} is not a module")
    return module


def _resolve(model: nn.Module, lora_name: str, path: str, lw: ModuleChange) -> tuple[nn.Module, nn.Linear]:
    """``(module at path, its base Linear)`` after checking that the LoRA's shapes fit it."""
    try:
        module = _submodule(model, path)
        base = _base_linear(module)
    except (AttributeError, TypeError) as e:
        raise ValueError(f"LoRA {lora_name!r}: key {path!r} names no Linear layer of this model ({e})") from None
    if not isinstance(lw, LoraWeight):
        _check_patches(lora_name, path, lw, base)
        return module, base
    if lw.down.ndim != 2 or lw.up.ndim != 2 or lw.up.shape[1] != lw.down.shape[0]:
        raise ValueError(
            f"LoRA {lora_name!r}: key {path!r} has down {tuple(lw.down.shape)} and up "
            f"{tuple(lw.up.shape)}, which are not [r, in] and [out, r]"
        )
    if lw.down.shape[1] != _width(path, lw, base) or lw.up.shape[0] != base.out_features:
        raise ValueError(
            f"LoRA {lora_name!r}: key {path!r} is {lw.up.shape[0]}x{lw.down.shape[1]}, "
            f"the layer is {base.out_features}x{base.in_features} (a LoRA for another model?)"
        )
    return module, base


def _width(path: str, change: ModuleChange, base: nn.Linear) -> int:
    """The input width ``change`` may have on ``base``: its own, or a wider one for a widenable layer."""
    width = input_width(change)
    if path in WIDENABLE and width is not None and width > base.in_features:
        return width
    return base.in_features


def _check_patches(lora_name: str, path: str, patches: tuple[Patch, ...], base: nn.Linear) -> None:
    for p in patches:
        if p.start + p.rows > base.out_features:
            raise ValueError(f"LoRA {lora_name!r}: key {path!r} patches rows past the layer's {base.out_features}")
        if (err := check_patch(p, _width(path, patches, base))) is not None:
            raise ValueError(f"LoRA {lora_name!r}: key {path!r}: {err}")
        if p.bias is not None and base.bias is None:
            raise ValueError(f"LoRA {lora_name!r}: key {path!r} changes a bias the layer does not have")


def float_weight(layer: nn.Linear) -> Tensor:
    """The layer's weight in float32 (dequantized for fp8 layers)."""
    return layer.dequantized_weight(torch.float32) if isinstance(layer, FP8Linear) else layer.weight.float()


def apply_loras(
    model: nn.Module, loras: Sequence[LoraSpec], mode: LoraMode = "unfused", *, dtype: torch.dtype = torch.float32
) -> list[str]:
    """Apply several LoRAs, each ``(LoraStateDict, scale, name)``, to ``model`` (a :class:`Flux`, BFL paths).

    Args:
        mode: ``"unfused"`` (default, exact) adds each LoRA at run time (removable, scale changeable);
            ``"fused"`` adds ``scale * delta`` into the weights. fp8 layers are dequantized, updated and
            re-quantized, which is not exact: e4m3 rounds away most of a delta below ~10 % of the weight
            (``benchmarks/fused_fp8_error.py``: at 1 % of max|W|, 97 % of the LoRA's effect is lost to rounding).
        dtype: dtype of unfused adapter tensors (float32 by default; bf16 to save memory on an accelerator).

    Returns:
        The names applied. Every LoRA is checked against the model before any is applied.
    """
    if mode not in ("unfused", "fused"):
        raise ValueError(f"mode must be 'unfused' or 'fused', got {mode!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"adapter dtype must be float32, bfloat16 or float16, got {dtype}")
    state = _state(model)
    taken = set(state.scales)
    resolved: list[_Resolved] = []
    for weights, scale, name in loras:
        if not name or "." in name or name in taken:
            raise ValueError(f"LoRA name {name!r} is empty, contains '.', or is already applied ({sorted(taken)})")
        if not weights:
            raise ValueError(f"LoRA {name!r} holds no weights")
        taken.add(name)
        linears = {p: w for p, w in weights.items() if not isinstance(w, NormOverride)}
        targets = [(path, lw, *_resolve(model, name, path, lw)) for path, lw in linears.items()]
        norms = [_resolve_norm(model, name, p, w) for p, w in weights.items() if isinstance(w, NormOverride)]
        resolved.append((name, float(scale), targets, norms))
    _check_replacements(state, resolved)
    for name, _, targets, norms in resolved:
        state.replaced[name] = _replace(targets, norms)
    if mode == "fused":
        state.fused.append(_Fused([name for name, *_ in resolved], _fuse_all(resolved)))
    for name, scale, targets, _ in resolved:
        if mode == "unfused":
            _add_unfused(state, name, scale, targets, dtype)
        state.scales[name] = scale
        log.info("applied LoRA %r (%d layers, scale %g, %s)", name, len(targets), scale, mode)
    return [name for name, *_ in resolved]


_Norm = tuple[str, nn.Module, str, Tensor]
"""``(parameter path, module holding it, attribute name, new value)``."""
_Target = tuple[str, ModuleChange, nn.Module, nn.Linear]
"""``(path, change, module at the path, its base Linear)``."""
_Resolved = tuple[str, float, list[_Target], list[_Norm]]
"""``(LoRA name, scale, its Linears, its norm overrides)``."""


def _resolve_norm(model: nn.Module, lora_name: str, path: str, change: NormOverride) -> _Norm:
    """The parameter a norm override replaces, after checking that it exists and the shape fits."""
    module_path, _, attr = path.rpartition(".")
    try:
        module = _submodule(model, module_path)
        param = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"LoRA {lora_name!r}: key {path!r} names no parameter of this model") from None
    if not isinstance(param, nn.Parameter) or param.shape != change.scale.shape:
        shape = tuple(getattr(param, "shape", ()))
        raise ValueError(f"LoRA {lora_name!r}: key {path!r} is {tuple(change.scale.shape)}, the model's {shape}")
    return path, module, attr, change.scale


def _check_replacements(state: _State, resolved: list[_Resolved]) -> None:
    """One LoRA at a time may replace a norm scale or widen a layer, and a layer is widened only bare."""
    held = {(id(r.module), r.attr): n for n, rs in state.replaced.items() for r in rs}
    fused_layers = {id(saved[0]) for group in state.fused for saved in group.saved}
    for name, _, targets, norms in resolved:
        wanted = [(id(module), attr, path) for path, module, attr, _ in norms]
        for path, lw, module, base in targets:
            if (id(base), "weight") in held:
                raise ValueError(f"LoRA {name!r} changes {path!r}, which LoRA {held[(id(base), 'weight')]!r} widened")
            if _width(path, lw, base) > base.in_features:
                if getattr(module, RUNTIME_ATTR, None) is not None or id(base) in fused_layers:
                    raise ValueError(f"LoRA {name!r} widens {path!r}, which already has LoRAs applied")
                wanted.append((id(base), "weight", path))
        for key, attr, path in wanted:
            if (key, attr) in held:
                raise ValueError(f"LoRA {name!r} replaces {path!r}, which LoRA {held[(key, attr)]!r} already replaced")
            held[(key, attr)] = name


def _replace(targets: list[_Target], norms: list[_Norm]) -> list[Replaced]:
    """Widen the layers that need it and override the norm scales; what restores them."""
    saved = [override(module, attr, value) for _, module, attr, value in norms]
    for path, lw, _, base in targets:
        width = _width(path, lw, base)
        if width > base.in_features:
            saved.append(widen(base, width))
    return saved


def _add_unfused(state: _State, name: str, scale: float, targets: list[_Target], dtype: torch.dtype) -> None:
    for _, lw, module, base in targets:
        runtime = getattr(module, RUNTIME_ATTR, None)
        if runtime is None:
            runtime = RuntimeLoras()
            module.add_module(RUNTIME_ATTR, runtime)
            module.register_forward_hook(_lora_hook)
        if isinstance(lw, LoraWeight):
            runtime.add(name, lw, scale, base.weight.device, dtype)
        else:
            runtime.add_dense(name, *dense_change(lw, float_weight(base)), scale, dtype)
    state.unfused[name] = [path for path, *_ in targets]


def _fuse_all(resolved: list[_Resolved]) -> list[_Saved]:
    """Add every LoRA's ``scale * delta`` into its layers, each layer updated (and re-quantized) once."""
    deltas: dict[int, tuple[nn.Linear, Tensor, Tensor | None]] = {}
    for _, scale, targets, _ in resolved:
        if scale == 0:
            continue  # leaves the weights, fp8 bytes included, untouched
        for _, lw, _, layer in targets:
            delta, bias = _layer_change(lw, layer)
            delta, bias = scale * delta, None if bias is None else scale * bias
            if id(layer) in deltas:
                _, before, before_bias = deltas[id(layer)]
                delta = before + delta
                bias = before_bias if bias is None else (bias if before_bias is None else before_bias + bias)
            deltas[id(layer)] = (layer, delta, bias)
    return [_fuse(layer, delta, bias) for layer, delta, bias in deltas.values()]


def _layer_change(lw: ModuleChange, layer: nn.Linear) -> tuple[Tensor, Tensor | None]:
    device = layer.weight.device
    if isinstance(lw, LoraWeight):
        return lw.scale * (lw.up.to(device, torch.float32) @ lw.down.to(device, torch.float32)), None
    return dense_change(lw, float_weight(layer))


def _fuse(layer: nn.Linear, delta: Tensor, bias: Tensor | None) -> _Saved:
    """``W += delta`` (fp8: dequantize, add, re-quantize), ``b += bias``; return what restores the layer exactly."""
    saved_bias = None if bias is None else layer.bias.data.to("cpu", copy=True)
    if bias is not None:
        layer.bias.data = (layer.bias.data.float() + bias.to(layer.bias.device)).to(layer.bias.dtype)
    if isinstance(layer, FP8Linear):
        saved: _Saved = (
            layer,
            layer.weight.data.to("cpu"),
            layer.weight_scale.detach().to("cpu", copy=True),
            saved_bias,
        )
        layer.set_weight(layer.dequantized_weight(torch.float32) + delta)
        return saved
    saved = (layer, layer.weight.data.to("cpu"), None, saved_bias)
    layer.weight.data = (layer.weight.data.float() + delta).to(layer.weight.dtype)
    return saved


def _unfuse(fused: _Fused) -> None:
    for layer, weight, scale, bias in reversed(fused.saved):
        layer.weight.data = weight.to(layer.weight.device)
        if scale is not None:
            cast(FP8Linear, layer).weight_scale.copy_(scale)
        if bias is not None:
            layer.bias.data = bias.to(layer.bias.device)


def remove_loras(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Remove LoRAs by name (all by default): unfused ones are detached, fused ones unfused exactly.

    Fused LoRAs come off last-in, first-out, a whole ``apply_loras`` call at a time.
    """
    state = _state(model)
    names = list(state.scales) if names is None else list(names)
    unknown = [n for n in names if n not in state.scales]
    if unknown:
        raise ValueError(f"no LoRA named {unknown} is applied; applied: {sorted(state.scales)}")
    wanted = {n for group in state.fused for n in group.names if n in names}
    groups, covered = 0, set[str]()
    while covered != wanted and covered <= wanted:
        covered |= set(state.fused[-1 - groups].names)
        groups += 1
    if covered != wanted:
        raise ValueError(
            f"fused LoRAs come off last-in, first-out, a whole apply_loras call at a time: "
            f"{[g.names for g in state.fused]}; cannot remove only {sorted(wanted)}"
        )
    for _ in range(groups):
        _unfuse(state.fused.pop())
    for name in (n for n in names if n in state.unfused):
        for path in state.unfused.pop(name):
            module = _submodule(model, path)
            runtime = getattr(module, RUNTIME_ATTR)
            runtime.drop(name)
            if not runtime.scales:
                _remove_hook(module)
                delattr(module, RUNTIME_ATTR)
    for name in names:
        for saved in reversed(state.replaced.pop(name, [])):
            restore(saved)
        del state.scales[name]
        log.info("removed LoRA %r", name)


def unfuse_loras(model: nn.Module) -> None:
    """Unfuse every fused LoRA, restoring the original weights bit for bit (unfused ones stay)."""
    remove_loras(model, [n for group in _state(model).fused for n in group.names])


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change the user scale of an unfused LoRA in place."""
    state = _state(model)
    if name not in state.unfused:
        raise ValueError(f"no unfused LoRA named {name!r}; unfused: {sorted(state.unfused)}")
    for path in state.unfused[name]:
        getattr(_submodule(model, path), RUNTIME_ATTR).scales[name] = float(scale)
    state.scales[name] = float(scale)


def applied_loras(model: nn.Module) -> dict[str, tuple[LoraMode, float]]:
    """``{name: (mode, user scale)}`` of the LoRAs applied to ``model``."""
    state = _state(model)
    fused = {n for group in state.fused for n in group.names}
    return {n: ("fused" if n in fused else "unfused", s) for n, s in state.scales.items()}
