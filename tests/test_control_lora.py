"""BFL control LoRAs (FLUX.1-Canny/Depth-dev-lora): ``lora_B.bias``, RMSNorm scale overrides and an ``img_in``
whose input is doubled (image + structure latents), read, applied unfused and fused on bf16 and fp8 bases
against the closed form written out here, and removed again bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flux_lora.lora.files import LoraFormatError, read_lora, write_lora
from flux_lora.lora.patches import NormOverride, Patch
from flux_lora.lora.runtime import apply_loras, remove_loras
from flux_lora.model.flux import PRESETS
from flux_lora.model.fp8 import FP8Linear, quantize_
from flux_lora.weights.tiny import random_flux

from helpers.dit import dit_inputs
from helpers.lora import CONTROL_NORMS, control_lora

P = PRESETS["tiny"]
WIDE = 2 * P.in_channels  # 128
HEAD = P.hidden_size // P.num_heads
QNORM, KNORM = CONTROL_NORMS


def _model(base: str):
    model = random_flux(P, 0)
    if base == "fp8":
        return quantize_(model, lambda name, m: True)  # img_in too: widened in its fp8 bytes
    return model.to(torch.bfloat16)


def _weight(layer) -> torch.Tensor:
    return layer.dequantized_weight(torch.float32) if isinstance(layer, FP8Linear) else layer.weight.float()


def _bytes(model) -> dict[str, torch.Tensor]:
    return {k: (v.view(torch.uint8) if v.dtype.itemsize == 1 else v).clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def test_reader_gives_norm_overrides_and_a_wide_img_in_patch():
    sd = control_lora()
    lora = read_lora(sd, P)
    assert isinstance(lora[QNORM], NormOverride) and torch.equal(lora[QNORM].scale, sd[QNORM])
    assert isinstance(lora[KNORM], NormOverride)
    (patch,) = lora["img_in"]
    assert isinstance(patch, Patch) and patch.kinds == ["LoRA", "bias"] and patch.weight_shape() == (64, WIDE)
    assert patch.weight.scale == 1.0  # no alpha: BFL's LinearLora has scale 1


@pytest.mark.parametrize(
    "key, value, message",
    [
        (QNORM, torch.ones(HEAD + 1), rf"{QNORM}.*\({HEAD + 1},\).*\({HEAD},\)"),
        ("img_in.lora_A.weight", torch.ones(4, WIDE + 1), r"img_in\.lora_A\.weight.*\(64, 129\)"),
    ],
)
def test_misshapen_control_parts_are_errors_naming_the_key(key, value, message):
    sd = control_lora() | {key: value}
    with pytest.raises(LoraFormatError, match=message):
        read_lora(sd, P)


def test_control_lora_cannot_be_written_as_plain_lora(tmp_path):
    with pytest.raises(LoraFormatError, match="norm override"):
        read_lora(control_lora(), P, plain=True)
    with pytest.raises(LoraFormatError, match="not a plain LoRA"):
        write_lora(tmp_path / "x.safetensors", read_lora(control_lora(), P), P)


@pytest.mark.parametrize("mode", ["unfused", "fused"])
@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_applied_as_the_closed_form_and_removed_bit_exactly(mode, base):
    sd, model = control_lora(), _model(base)
    layer = model.img_in
    before, w, b = _bytes(model), _weight(layer), layer.bias.float().clone()
    x = torch.randn(3, WIDE, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    apply_loras(model, [(read_lora(sd, P), 0.7, "canny")], mode=mode)
    # img_in: [W | 0] + s * B @ A, b + s * bias
    wide = torch.cat([w, torch.zeros_like(w)], dim=1)
    target = wide + 0.7 * sd["img_in.lora_B.weight"] @ sd["img_in.lora_A.weight"]
    expected = F.linear(x.float(), target, b + 0.7 * sd["img_in.lora_B.bias"])
    assert layer.in_features == WIDE and layer.weight.shape == (P.hidden_size, WIDE)
    if mode == "fused":  # re-quantized (fp8) or rounded (bf16) once
        step = target.abs().amax(dim=1, keepdim=True) / (8 if base == "fp8" else 128)
        assert ((_weight(layer) - target).abs() <= step).all()
    got = layer(x).float()
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    if mode == "unfused":  # the base ignores the structure latents; only the LoRA reads them
        assert not _weight(layer)[:, P.in_channels :].any()
    # norm scales: replaced whatever the strength, in the model's dtype
    for path, key in ((QNORM, QNORM), (KNORM, f"diffusion_model.{KNORM}")):
        param = model.get_parameter(path)
        assert torch.equal(param, sd[key].to(param.dtype))
    x_img = dit_inputs(P, batch=1)
    model(**(x_img | {"img": torch.cat([x_img["img"], x_img["img"]], -1).to(torch.bfloat16)}))  # runs 128 wide
    remove_loras(model)
    assert _same(_bytes(model), before) and layer.in_features == P.in_channels
    assert not hasattr(layer, "runtime_loras")
    model(**(x_img | {"img": x_img["img"].to(torch.bfloat16)}))  # 64 wide again


def test_one_control_lora_at_a_time():
    model = random_flux(P, 0)
    depth = read_lora(control_lora(2), P)
    apply_loras(model, [({"img_in": read_lora(control_lora(), P)["img_in"]}, 1.0, "plain")])
    with pytest.raises(ValueError, match=r"'depth' changes 'img_in', which LoRA 'plain' widened"):
        apply_loras(model, [(depth, 1.0, "depth")])
    remove_loras(model)
    qkv = {"double_blocks.0.img_attn.qkv": depth["double_blocks.0.img_attn.qkv"]}
    apply_loras(model, [(qkv, 1.0, "qkv")], mode="fused")
    apply_loras(model, [(read_lora(control_lora(), P), 1.0, "canny")])  # other layers may hold LoRAs
    norms_only = {QNORM: depth[QNORM]}
    with pytest.raises(ValueError, match=rf"'depth' replaces '{QNORM}', which LoRA 'canny' already replaced"):
        apply_loras(model, [(norms_only, 1.0, "depth")])
    remove_loras(model)
    apply_loras(model, [(norms_only, 1.0, "depth")])
    narrow = {"img_in": read_lora(control_lora(), P)["img_in"][0].weight}
    narrow["img_in"].down = narrow["img_in"].down[:, : P.in_channels]
    apply_loras(model, [(narrow, 1.0, "narrow")])
    with pytest.raises(ValueError, match=r"'canny' widens 'img_in', which already has LoRAs"):
        apply_loras(model, [({"img_in": depth["img_in"]}, 1.0, "canny")])
