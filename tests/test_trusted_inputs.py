"""Inputs that used to load silently wrong: non-finite LoRAs, e5m2 scaled fp8, keys the reader cannot apply."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.lora.convert import main as convert_main
from flux_lora.lora.files import LoraFormatError, read_lora, to_kohya_state_dict, write_lora
from flux_lora.lora.keys import linear_shapes
from flux_lora.lora.runtime import apply_loras
from flux_lora.lora.weight import LoraWeight
from flux_lora.model.flux import PRESETS
from flux_lora.model.fp8 import FP8Linear
from flux_lora.weights.loading import load_flow_model
from flux_lora.weights.safetensors_io import CheckpointError

from helpers.dit import dit_inputs

P = PRESETS["tiny"]
QKV = "double_blocks.0.img_attn.qkv"
QKV_KEY = "lora_unet_double_blocks_0_img_attn_qkv"


def _kohya(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = 3 * P.hidden_size, P.hidden_size
    lora = {QKV: LoraWeight(torch.randn(2, in_f, generator=g), torch.randn(out_f, 2, generator=g), 2.0)}
    return to_kohya_state_dict(lora, P)


# ------------------------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_lora_tensor_is_rejected_naming_the_key(value):
    sd = _kohya()
    sd[f"{QKV_KEY}.lora_up.weight"][3, 1] = value
    with pytest.raises(LoraFormatError, match=rf"{QKV_KEY}\.lora_up\.weight.*NaN or Inf"):
        read_lora(sd, P)


def test_convert_refuses_a_nan_lora_and_writes_nothing(tmp_path, caplog):
    sd = _kohya()
    sd[f"{QKV_KEY}.lora_down.weight"][0, 0] = float("nan")
    src, out = tmp_path / "nan.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(src))
    with caplog.at_level(logging.ERROR):
        assert convert_main([str(src), str(out), "--to", "diffusers", "--model", "tiny"]) == 1
    assert not out.exists()
    assert f"{QKV_KEY}.lora_down.weight" in caplog.text


def test_pipeline_refuses_non_finite_latents(tiny_dev_dir):
    pipe = FluxPipeline.from_pretrained(tiny_dev_dir, dtype=torch.float32, device="cpu")
    huge = LoraWeight(torch.full((1, P.hidden_size), 1e30), torch.full((3 * P.hidden_size, 1), 1e30), 1.0)
    apply_loras(pipe.dit, [({QKV: huge}, 1.0, "huge")])
    with pytest.raises(ValueError, match="NaN or Inf"):
        pipe("a dog", height=32, width=32, num_inference_steps=1, seed=0, progress=False)
    nan = torch.full((1, 16, 4, 4), float("nan"))
    with pytest.raises(ValueError, match="latents.*NaN or Inf"):
        pipe("a dog", height=32, width=32, num_inference_steps=1, latents=nan, progress=False)


# ---------------------------------------------------------------------------------- scaled fp8 storage


def _velocity(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**dit_inputs(model.params, seed=0))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("quantize", [None, "float8_e4m3fn"])
def test_comfy_scaled_fp8_applies_the_scale_for_every_fp8_dtype(tiny_dev_dir, tmp_path, fp8, quantize):
    sd = load_file(str(tiny_dev_dir / "flux1-dev.safetensors"))
    comfy = {"scaled_fp8": torch.zeros(0, dtype=fp8)}
    for k, v in sd.items():
        if v.ndim == 2:
            scale = v.abs().max() / torch.finfo(fp8).max  # the stored values are large: ~448 or ~57344
            comfy[k] = (v / scale).to(fp8)
            comfy[k.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
        else:
            comfy[k] = v
    path = tmp_path / "comfy-scaled.safetensors"
    save_file(comfy, str(path), metadata={"flux_lora.params": json.dumps(P.to_dict())})
    model = load_flow_model(path, dtype=torch.float32, quantize=quantize)
    layer = model.single_blocks[0].linear1
    assert isinstance(layer, FP8Linear)
    ref = sd["single_blocks.0.linear1.weight"]
    torch.testing.assert_close(layer.dequantized_weight(), ref, rtol=0.25, atol=ref.abs().max().item() * 0.07)
    expected = _velocity(load_flow_model(tiny_dev_dir, dtype=torch.float32))
    out = _velocity(model)
    assert torch.isfinite(out).all() and (out - expected).norm() / expected.norm() < 0.15


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("quantize", [None, "float8_e4m3fn"])
def test_scaled_fp8_layers_keep_the_files_values_exactly(tiny_dev_dir, tmp_path, fp8, quantize):
    """A ComfyUI scaled fp8 file's layers keep their own bytes and scale (e5m2 too: no second rounding to e4m3),
    so the loaded layer's weight is the file's dequantized weight exactly, and the fp8 storage stays 1 byte."""
    sd = load_file(str(tiny_dev_dir / "flux1-dev.safetensors"))
    comfy: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=fp8)}
    for k, v in sd.items():
        if v.ndim == 2:
            scale = v.abs().max() / (0.9 * torch.finfo(fp8).max)  # no power of two
            comfy[k] = (v / scale).to(fp8)
            comfy[k.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
        else:
            comfy[k] = v
    path = tmp_path / "comfy-scaled.safetensors"
    save_file(comfy, str(path), metadata={"flux_lora.params": json.dumps(P.to_dict())})
    model = load_flow_model(path, dtype=torch.bfloat16, quantize=quantize)
    for name in ("single_blocks.0.linear1", "double_blocks.1.img_mlp.0"):
        layer = model.get_submodule(name)
        assert isinstance(layer, FP8Linear) and layer.weight.dtype == fp8
        file_weight = comfy[f"{name}.weight"].float() * comfy[f"{name}.scale_weight"].float()
        assert torch.equal(layer.dequantized_weight(torch.float32), file_weight)
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        want = torch.nn.functional.linear(x, file_weight, layer.bias.float())
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- keys the reader skips


def test_unappliable_keys_are_an_error_listing_them_unless_partial_is_allowed(tmp_path, caplog):
    norm = "double_blocks.9.img_attn.norm.query_norm.scale"  # a norm override for a block the model lacks
    sd = {**_kohya(), norm: torch.ones(P.hidden_size // P.num_heads)}
    path = tmp_path / "control.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraFormatError, match=rf"norm keys.*{norm}.*allow_partial"):
        read_lora(path, P)
    with caplog.at_level(logging.WARNING, logger="flux_lora"):
        lora = read_lora(path, P, allow_partial=True)
    assert set(lora) == {QKV} and norm in caplog.text


def test_convert_allow_partial_flag(tmp_path):
    sd = {**_kohya(), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4)}
    src, out = tmp_path / "te.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(src))
    assert convert_main([str(src), str(out), "--to", "kohya", "--model", "tiny"]) == 1 and not out.exists()
    assert convert_main([str(src), str(out), "--to", "kohya", "--model", "tiny", "--allow-partial"]) == 0
    assert set(read_lora(out, P)) == {QKV}


def test_unknown_kinds_are_named(tmp_path):
    for extra, kind in (
        (".hada_w1_a", "LoHa"),
        (".lokr_w1", "LoKr"),
        (".diff", "full weight patches"),
    ):
        sd = {**_kohya(), f"lora_unet_single_blocks_9_linear2{extra}": torch.ones(2, 2)}  # no block 9
        with pytest.raises(LoraFormatError, match=kind):
            read_lora(sd, P)


def test_kohya_write_warning_names_the_tools_that_drop_non_block_modules(tmp_path, caplog):
    g = torch.Generator().manual_seed(1)
    for name in ("final_layer.linear", "img_in"):
        out_f, in_f = linear_shapes(P)[name]
        lora = {name: LoraWeight(torch.randn(2, in_f, generator=g), torch.randn(out_f, 2, generator=g), 2.0)}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flux_lora"):
            write_lora(tmp_path / f"{name}.safetensors", lora, P)
        assert "diffusers drops" in caplog.text and name in caplog.text
        assert ("kohya sd-scripts' LoRA loader refuses final_layer.linear" in caplog.text) == (
            name == "final_layer.linear"
        )


# ------------------------------------------------------------------------------------ ComfyUI comfy_quant


def _comfy_quant_file(tiny_dev_dir, tmp_path, fmt: str, fp8=torch.float8_e4m3fn):
    sd = load_file(str(tiny_dev_dir / "flux1-dev.safetensors"))
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.startswith(("double_blocks", "single_blocks")):
            scale = v.abs().max() / torch.finfo(fp8).max
            base = k.removesuffix(".weight")
            out[k] = (v / scale).to(fp8)
            out[f"{base}.weight_scale"] = scale.float()  # per tensor, 0-dim
            out[f"{base}.input_scale"] = torch.tensor(1.0)
            out[f"{base}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
        else:
            out[k] = v
    path = tmp_path / f"comfy-quant-{fmt}.safetensors"
    save_file(out, str(path), metadata={"flux_lora.params": json.dumps(P.to_dict())})
    return path, sd


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_comfy_quant_fp8_layout_loads(tiny_dev_dir, tmp_path, fp8):
    name = str(fp8).removeprefix("torch.")
    path, sd = _comfy_quant_file(tiny_dev_dir, tmp_path, name, fp8)
    model = load_flow_model(path, dtype=torch.float32)
    ref = sd["double_blocks.1.img_mlp.0.weight"]
    got = model.double_blocks[1].img_mlp[0].dequantized_weight()
    torch.testing.assert_close(got, ref, rtol=0.25, atol=ref.abs().max().item() * 0.07)
    expected = _velocity(load_flow_model(tiny_dev_dir, dtype=torch.float32))
    assert (_velocity(model) - expected).norm() / expected.norm() < 0.15


def test_comfy_quant_other_formats_get_a_targeted_error(tiny_dev_dir, tmp_path):
    path, _ = _comfy_quant_file(tiny_dev_dir, tmp_path, "nvfp4")
    with pytest.raises(CheckpointError, match=r"comfy_quant.*'nvfp4'.*double_blocks\.0"):
        load_flow_model(path, dtype=torch.float32)
