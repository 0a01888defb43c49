"""Run-time and fused LoRAs on the tiny DiT (float32 and fp8 bases), against a hand-merged float32 oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flux_lora.lora.runtime import (
    RUNTIME_ATTR,
    RuntimeLoras,
    applied_loras,
    apply_loras,
    remove_loras,
    set_lora_scale,
    unfuse_loras,
)
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.fp8 import FP8, FP8Linear, quantize_
from flux_lora.weights.tiny import random_flux

from helpers.dit import dit_inputs
from helpers.lora import random_lora

PATHS = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_mlp.2",
    "single_blocks.0.linear1",
    "single_blocks.1.linear2",
    "final_layer.adaLN_modulation.1",
    "img_in",
]


@pytest.fixture
def model() -> Flux:
    return random_flux(PRESETS["tiny"], seed=0).eval()


@pytest.fixture
def fp8_model(model) -> Flux:
    return quantize_(copy.deepcopy(model))


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**dit_inputs(model.params, batch=1))


def _hand_merged(model: nn.Module, loras) -> nn.Module:
    """A float32 copy (fp8 layers dequantized) with ``scale * up @ down * alpha / r`` added to each weight."""
    merged = copy.deepcopy(model)
    for name, m in list(merged.named_modules()):
        if isinstance(m, FP8Linear):
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, m.to_linear(torch.float32))
    for weights, scale, _ in loras:
        for path, lw in weights.items():
            layer = merged.get_submodule(path)
            layer.weight.data += scale * lw.delta(torch.float32)
    return merged


def _loras(model, scales=(0.8, -1.3)):
    a = random_lora(model, PATHS, rank=2, alpha=4.0, seed=1)
    b = random_lora(model, PATHS[:3] + ["single_blocks.0.modulation.lin"], rank=3, alpha=1.5, seed=2)
    return [(a, scales[0], "a"), (b, scales[1], "b")]


def _fp8_bytes(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items()}


def test_unfused_equals_hand_merge_and_removes_exactly(model):
    base = _run(model)
    keys = list(model.state_dict())
    loras = _loras(model)
    oracle, oracle_b = _run(_hand_merged(model, loras)), _run(_hand_merged(model, loras[1:]))
    apply_loras(model, loras)
    out = _run(model)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    assert (out - base).abs().max() > 1e-2
    assert list(model.state_dict()) == keys  # adapters never enter the state dict
    assert applied_loras(model) == {"a": ("unfused", 0.8), "b": ("unfused", -1.3)}

    remove_loras(model, ["a"])
    torch.testing.assert_close(_run(model), oracle_b, atol=1e-5, rtol=1e-5)
    remove_loras(model)
    assert torch.equal(_run(model), base)
    assert not any(hasattr(m, RUNTIME_ATTR) or m._forward_hooks for m in model.modules())
    assert applied_loras(model) == {}


def test_two_loras_add(model):
    loras = _loras(model)
    together = copy.deepcopy(model)
    apply_loras(together, loras)
    apply_loras(model, loras[:1])
    apply_loras(model, loras[1:])
    torch.testing.assert_close(_run(model), _run(together), atol=1e-6, rtol=1e-6)
    only_a, only_b = copy.deepcopy(model), copy.deepcopy(model)
    remove_loras(only_a, ["b"])
    remove_loras(only_b, ["a"])
    base = copy.deepcopy(model)
    remove_loras(base)
    # the output is not linear in the LoRA, but each layer's weight update is: check it there
    layer = "double_blocks.0.img_attn.qkv"
    x = torch.randn(4, 64)

    def delta(m):
        with torch.no_grad():
            return m.get_submodule(layer)(x) - base.get_submodule(layer)(x)

    torch.testing.assert_close(delta(model), delta(only_a) + delta(only_b), atol=1e-5, rtol=1e-5)


def test_fused_equals_unfused_and_unfuses_bit_for_bit(model):
    original = _fp8_bytes(model)
    loras = _loras(model)
    oracle, oracle_a = _run(_hand_merged(model, loras)), _run(_hand_merged(model, loras[:1]))
    unfused = copy.deepcopy(model)
    apply_loras(unfused, loras)
    apply_loras(model, loras[:1], mode="fused")
    apply_loras(model, loras[1:], mode="fused")
    torch.testing.assert_close(_run(model), _run(unfused), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_run(model), oracle, atol=1e-5, rtol=1e-5)
    assert applied_loras(model) == {"a": ("fused", 0.8), "b": ("fused", -1.3)}
    with pytest.raises(ValueError, match="last-in, first-out"):
        remove_loras(model, ["a"])
    remove_loras(model, ["b"])
    torch.testing.assert_close(_run(model), oracle_a, atol=1e-5, rtol=1e-5)
    unfuse_loras(model)
    assert all(torch.equal(t, original[n]) for n, t in model.state_dict().items())


def test_fp8_base(fp8_model):
    base_bytes = _fp8_bytes(fp8_model)
    qkv = fp8_model.get_submodule(PATHS[0])
    assert qkv.weight.dtype == FP8
    loras = _loras(fp8_model)
    oracle = _run(_hand_merged(fp8_model, loras))

    unfused = copy.deepcopy(fp8_model)
    apply_loras(unfused, loras)
    runtime = getattr(unfused.get_submodule(PATHS[0]), RUNTIME_ATTR)
    assert {b.dtype for b in runtime.buffers()} == {torch.float32}  # never fp8
    assert unfused.get_submodule(PATHS[0]).weight.dtype == FP8
    torch.testing.assert_close(_run(unfused), oracle, atol=1e-5, rtol=1e-5)

    exact = qkv.dequantized_weight(torch.float32) + sum(s * w[PATHS[0]].delta() for w, s, _ in loras)
    apply_loras(fp8_model, loras, mode="fused")
    assert qkv.weight.dtype == FP8
    # fused weight = dequantized base + delta, up to one fp8 rounding (3 mantissa bits: <= row max / 16)
    err = (qkv.dequantized_weight(torch.float32) - exact).abs()
    assert (err <= exact.abs().amax(dim=1, keepdim=True) / 16).all() and err.max() > 0
    fused_out = _run(fp8_model)
    assert (fused_out - oracle).abs().mean() < 0.05 * oracle.abs().mean()  # within re-quantization error

    remove_loras(fp8_model)
    after = fp8_model.state_dict()
    assert all(
        torch.equal(
            after[n].view(torch.uint8) if after[n].dtype == FP8 else after[n],
            t.view(torch.uint8) if t.dtype == FP8 else t,
        )
        for n, t in base_bytes.items()
    )


@pytest.mark.parametrize("mode", ["unfused", "fused"])
@pytest.mark.parametrize("fp8", [False, True])
def test_scale_zero_is_the_base_model(model, fp8_model, mode, fp8):
    m = fp8_model if fp8 else model
    base, state = _run(m), _fp8_bytes(m)
    apply_loras(m, _loras(m, scales=(0.0, 0.0)), mode=mode)
    assert torch.equal(_run(m), base)
    if mode == "fused":
        after = m.state_dict()
        assert all(torch.equal(after[n].float(), t.float()) for n, t in state.items())


def test_bf16_adapters_and_scale_change(fp8_model):
    loras = _loras(fp8_model)
    apply_loras(fp8_model, loras[:1], dtype=torch.bfloat16)
    runtime: RuntimeLoras = getattr(fp8_model.get_submodule(PATHS[0]), RUNTIME_ATTR)
    assert {b.dtype for b in runtime.buffers()} == {torch.bfloat16}
    fresh = copy.deepcopy(fp8_model)
    remove_loras(fresh)
    apply_loras(fresh, [(loras[0][0], 2.5, "a")], dtype=torch.bfloat16)
    set_lora_scale(fp8_model, "a", 2.5)
    assert torch.equal(_run(fp8_model), _run(fresh))
    assert applied_loras(fp8_model) == {"a": ("unfused", 2.5)}


def test_on_peft_wrapped_layers(model):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["qkv"]), model)  # B = 0: no effect
    loras = _loras(model)
    unwrapped = random_flux(PRESETS["tiny"], seed=0).eval()
    oracle = _run(_hand_merged(unwrapped, loras))
    for mode in ("unfused", "fused"):
        apply_loras(model, loras, mode=mode)
        torch.testing.assert_close(_run(model), oracle, atol=1e-5, rtol=1e-5)
        remove_loras(model)
    assert torch.equal(_run(model), _run(unwrapped))


def test_bad_loras_are_rejected_with_clear_errors(model):
    good = random_lora(model, PATHS[:1])
    with pytest.raises(ValueError, match=r"'x'.*'double_blocks\.7\.img_attn\.qkv' names no Linear"):
        apply_loras(model, [({"double_blocks.7.img_attn.qkv": good[PATHS[0]]}, 1.0, "x")])
    with pytest.raises(ValueError, match=r"'x'.*'double_blocks\.0\.img_norm1' names no Linear"):
        apply_loras(model, [({"double_blocks.0.img_norm1": good[PATHS[0]]}, 1.0, "x")])
    wrong = random_lora(model, ["single_blocks.0.linear2"])["single_blocks.0.linear2"]
    with pytest.raises(ValueError, match="another model"):
        apply_loras(model, [({PATHS[0]: wrong}, 1.0, "x")])
    apply_loras(model, [(good, 1.0, "x")])
    with pytest.raises(ValueError, match="already applied"):
        apply_loras(model, [(good, 1.0, "x")])
    with pytest.raises(ValueError, match="mode"):
        apply_loras(model, [(good, 1.0, "y")], mode="merged")
    with pytest.raises(ValueError, match="no LoRA named"):
        remove_loras(model, ["nope"])
    # nothing was half-applied by the failures
    assert applied_loras(model) == {"x": ("unfused", 1.0)}


def test_through_activation_checkpoint_wrappers(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    loras = _loras(model)
    oracle, base = _run(_hand_merged(model, loras)), _run(model)
    for blocks in (model.double_blocks, model.single_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)
    apply_loras(model, loras)
    torch.testing.assert_close(_run(model), oracle, atol=1e-5, rtol=1e-5)
    set_lora_scale(model, "a", 0.0)
    remove_loras(model)
    assert torch.equal(_run(model), base)
