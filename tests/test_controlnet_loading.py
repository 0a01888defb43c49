"""Loading ControlNets from the diffusers layout (tiny folders, real loader), fp8 storage, the errors for bad
input, and the inpainting (alimama) input contract. No diffusers needed here."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flux_lora import sampling as S
from flux_lora.model.autoencoder import AE_PRESETS
from flux_lora.model.controlnet import (
    ControlNetParams,
    FluxControlNet,
    check_compatible,
    control_condition,
    encode_control,
    mask_to_latent,
    resolve_mode,
)
from flux_lora.model.flux import PRESETS
from flux_lora.model.fp8 import FP8, FP8Linear, default_predicate, quantize_, storage_bytes
from flux_lora.weights import tiny
from flux_lora.weights.controlnet_loading import (
    controlnet_config,
    controlnet_params_from_config,
    load_controlnet,
    resolve_controlnet,
)
from flux_lora.weights.safetensors_io import CheckpointError, iter_tensors
from flux_lora.weights.tiny import random_autoencoder, tiny_controlnet_params, write_tiny_controlnet

from helpers.dit import controlnet_inputs, flat
from helpers.numerics import rel_err

TINY, DEV = PRESETS["tiny"], PRESETS["flux-dev"]


# ------------------------------------------------------------------------------------------ loading


@torch.no_grad()
def test_sharded_folder_loads_like_single_file(tmp_path, tiny_union_controlnet_dir):
    sharded = write_tiny_controlnet(tmp_path, union=True, seed=0, shards=3)
    assert len(list(sharded.glob("diffusion_pytorch_model-*.safetensors"))) == 3
    a = load_controlnet(sharded, dtype=torch.float32).state_dict()
    b = load_controlnet(tiny_union_controlnet_dir, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loads_config_driven_architecture(tiny_controlnet_dir, tiny_union_controlnet_dir):
    plain = load_controlnet(tiny_controlnet_dir, dtype=torch.float32)
    union = load_controlnet(tiny_union_controlnet_dir / "config.json", dtype=torch.float32)  # a file inside
    cfg = json.loads((tiny_union_controlnet_dir / "config.json").read_text())
    assert len(union.double_blocks) == cfg["num_layers"]
    assert len(union.single_blocks) == cfg["num_single_layers"]
    assert union.mode_embedder.num_embeddings == cfg["num_mode"] and plain.mode_embedder is None
    assert not any(p.requires_grad for p in union.parameters()) and not union.training
    assert plain.controlnet_blocks[0].weight.abs().max() > 0  # random, not zero-initialised


def test_cli_writes_both_controlnets(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "write_tiny_model", lambda out, variant, seed: out)  # tested elsewhere
    tiny.main([str(tmp_path), "--variant", "schnell"])
    plain = load_controlnet(tmp_path / "controlnet", dtype=torch.float32)
    union = load_controlnet(tmp_path / "controlnet-union", dtype=torch.float32)
    assert not plain.params.is_union and union.params.num_modes == tiny.TINY_UNION_MODES
    assert not union.params.trunk.guidance_embed  # follows the schnell DiT
    check_compatible(plain, PRESETS["tiny-schnell"])
    tiny.main([str(tmp_path / "bare"), "--no-controlnets"])
    assert not (tmp_path / "bare" / "controlnet").exists()


# ------------------------------------------------------------------------------------------ fp8


@torch.no_grad()
def test_fp8_storage_and_error(tiny_union_controlnet_dir):
    """fp8 against float32, with float32 compute (the quantization alone) and bf16 compute (as deployed), for
    the "blocks" policy (double and single blocks; embedders and output projections stay in float) and "all"."""

    def load(dtype: torch.dtype, policy: str | None = None) -> FluxControlNet:
        quantize = "float8_e4m3fn" if policy else None
        return load_controlnet(tiny_union_controlnet_dir, dtype=dtype, quantize=quantize, quant_policy=policy)

    f32, bf16 = load(torch.float32), load(torch.bfloat16)
    fp8 = load(torch.bfloat16, "blocks")
    quantized = {n for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    assert quantized and all(n.startswith(("double_blocks.", "single_blocks.")) for n in quantized)
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype == FP8
    assert fp8.controlnet_blocks[0].weight.dtype == torch.bfloat16  # outputs go straight into the DiT

    x = controlnet_inputs(f32.params, lat_h=8, lat_w=8)
    ref = flat(f32(**x, mode="depth"))
    models = {
        "bf16": bf16,
        "fp8 blocks": fp8,
        "fp8 all": load(torch.bfloat16, "all"),
        "fp8 blocks, f32 compute": load(torch.float32, "blocks"),
        "fp8 all, f32 compute": load(torch.float32, "all"),
    }
    errors = {}
    for name, m in models.items():
        dtype = m.txt_in.bias.dtype  # the compute dtype (biases stay in float, fp8 or not)
        xm = {**x, "img": x["img"].to(dtype)}  # the other inputs follow the compute dtype
        errors[name] = round(rel_err(flat(m(**xm, mode="depth")), ref), 4)
    sizes = {name: round(storage_bytes(models[name]) / storage_bytes(bf16), 3) for name in ("fp8 blocks", "fp8 all")}
    assert errors["fp8 blocks, f32 compute"] < 0.01 < errors["fp8 all, f32 compute"] < 0.06
    assert errors["bf16"] < 0.02 and errors["fp8 blocks"] < 0.02 and errors["fp8 all"] < 0.06
    assert sizes["fp8 blocks"] < 0.7  # the tiny model's embedders are a large share; see the full-size test
    assert sizes["fp8 all"] < min(0.55, sizes["fp8 blocks"])  # measured: 0.609 blocks, 0.532 all


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("InstantX union-alpha", ControlNetParams(replace(DEV, depth=5, depth_single_blocks=10), num_modes=10)),
        ("jasperai depth / normals / upscaler", ControlNetParams(replace(DEV, depth=5, depth_single_blocks=0))),
        (
            "alimama inpainting alpha / beta",
            ControlNetParams(replace(DEV, depth=6, depth_single_blocks=0), extra_channels=4),
        ),
    ],
)
def test_fp8_storage_at_full_size(name, params):
    """Storage of the real ControlNets (built on the meta device): the blocks hold ~95 % of the weights."""
    with torch.device("meta"):
        bf16 = FluxControlNet(params).to(torch.bfloat16)
        fp8 = quantize_(FluxControlNet(params).to(torch.bfloat16), default_predicate("blocks"))
    ratio = storage_bytes(fp8) / storage_bytes(bf16)
    assert 0.5 < ratio < 0.54  # measured: 0.529 InstantX, 0.526 jasperai, 0.524 alimama


# ------------------------------------------------------------------------------------------ bad input


def _write_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"_class_name": "SD3ControlNetModel"}, "not a FLUX ControlNet"),
        ({"_class_name": "FluxTransformer2DModel"}, "FLUX DiT, not a ControlNet"),
        ({"conditioning_embedding_channels": 16}, "pixel-space hint encoder"),
        ({"patch_size": 2}, "patch_size 2"),
        ({"use_fancy_norm": True}, "unknown config keys ['use_fancy_norm']"),
        ({"extra_condition_channels": 12}, "extra_channels=12 is not supported"),
        ({"attention_head_dim": 30}, "must equal the head size"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, changes, message):
    folder = write_tiny_controlnet(tmp_path, seed=0)
    _write_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        load_controlnet(folder, dtype=torch.float32)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_layers": 2}, r"missing keys \['double_blocks.1"),
        ({"num_single_layers": 1}, r"unexpected key '\w*single_\w*blocks.1.*for the ControlNet in .*config"),
        ({"extra_condition_channels": 4}, r"'control_in.weight' has shape \(64, 64\), the model .* \(64, 68\)"),
        ({"num_mode": 10}, r"missing keys \['mode_embedder.weight'\]"),
    ],
)
def test_config_and_weights_that_disagree(tmp_path, changes, message):
    folder = write_tiny_controlnet(tmp_path, seed=0)
    _write_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_controlnet(folder, dtype=torch.float32)


def test_modelscope_ids_resolve_through_the_hub(tmp_path):
    calls = []

    def download(model_id: str, **kwargs) -> str:
        calls.append((model_id, kwargs["allow_patterns"]))
        return str(write_tiny_controlnet(tmp_path / model_id.replace("/", "--"), union=True))

    model_id = "InstantX/FLUX.1-dev-Controlnet-Union-alpha"
    cn = load_controlnet(model_id, dtype=torch.float32, resolve=lambda s: resolve_controlnet(s, download))
    assert cn.params.is_union and calls == [(model_id, ["*.json", "diffusion_pytorch_model*.safetensors"])]

    def offline(model_id: str, **kwargs) -> str:
        raise ConnectionError("no network")

    offline_message = r"neither a local .*offline and not in the download cache.*\); pass a local"
    with pytest.raises(CheckpointError, match=offline_message):
        resolve_controlnet(model_id, offline)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="neither a local folder .* no such folder"):
        load_controlnet(tmp_path / "InstantX/FLUX.1-dev-Controlnet-Union-alpha")
    with pytest.raises(CheckpointError, match="holds no config.json"):
        load_controlnet(tmp_path)
    resolved = load_controlnet(
        "some/model-id", dtype=torch.float32, resolve=lambda s: write_tiny_controlnet(tmp_path / s.replace("/", "--"))
    )
    assert controlnet_config(resolved.params) == controlnet_config(tiny_controlnet_params())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(hidden_size=96, num_heads=3), "hidden size 96 != the DiT's 64"),
        (dict(context_in_dim=48), r"T5 width \(joint_attention_dim\) 48 != the DiT's 32"),
        (dict(axes_dim=(4, 14, 14)), r"RoPE axes \(4, 14, 14\) != the DiT's \(8, 12, 12\)"),
        (dict(depth=3), "3 double blocks > the DiT's 2"),
        (dict(in_channels=128), "latent channels"),
    ],
)
def test_controlnet_for_another_base_model(change, message):
    p = ControlNetParams(replace(tiny_controlnet_params().trunk, **change))
    with pytest.raises(ValueError, match="built for another base model: .*" + message):
        check_compatible(FluxControlNet(p), TINY)
    check_compatible(tiny_controlnet_params(union=True), TINY)  # ours fits


def test_union_modes():
    names = ("canny", "Tile", "depth", "blur", "pose", "gray", "lq", "low_quality", "7", 9)
    assert [resolve_mode(m, 10) for m in names] == [0, 1, 2, 3, 4, 5, 6, 6, 7, 9]
    with pytest.raises(ValueError, match=r"unknown union control mode 'sketch'; choose one of \['blur'"):
        resolve_mode("sketch", 10)
    with pytest.raises(ValueError, match="out of range: this model has 4 modes"):
        resolve_mode("lq", 4)
    with pytest.raises(ValueError, match="not a union model"):
        resolve_mode("canny", None)
    cn = FluxControlNet(tiny_controlnet_params(union=True))
    with pytest.raises(ValueError, match="union ControlNet .* pass a control mode"):
        cn(**controlnet_inputs(cn.params))
    with pytest.raises(ValueError, match="out of range"):
        cn(**controlnet_inputs(cn.params), mode=torch.tensor([0, 10]))
    plain = FluxControlNet(tiny_controlnet_params())
    with pytest.raises(ValueError, match="not a union model"):
        plain(**controlnet_inputs(plain.params), mode="canny")


# ------------------------------------------------------------------------------------------ inpainting


INPAINT = tiny_controlnet_params(inpainting=True)


def test_inpainting_channels_come_from_the_config(tmp_path):
    folder = write_tiny_controlnet(tmp_path, seed=0, params=INPAINT)
    assert json.loads((folder / "config.json").read_text())["extra_condition_channels"] == 4
    shapes = {k: t.shape for k, t in iter_tensors(folder / "diffusion_pytorch_model.safetensors")}
    assert shapes["controlnet_x_embedder.weight"] == (TINY.hidden_size, TINY.in_channels + 4)
    assert shapes["x_embedder.weight"] == (TINY.hidden_size, TINY.in_channels)
    cn = load_controlnet(folder, dtype=torch.float32)
    assert cn.params.is_inpainting and cn.control_in.in_features == 68
    alimama = dict(num_layers=6, num_single_layers=0, extra_condition_channels=4, guidance_embeds=True)
    assert controlnet_params_from_config(alimama).control_channels == 68


def test_mask_packing_layout():
    """alimama's recipe: binarise, resize the (1 = repaint) mask to the latent grid by nearest neighbour,
    invert, concatenate after the 16 latent channels, then pack 2x2: the mask lands in the last 4 channels of
    each token, ordered (row, column) within the patch like the latents."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 6, 4, generator=g)
    mask = (torch.rand(2, 1, 48, 32, generator=g) > 0.6).float() * 0.9  # 0.9 still counts as "repaint"
    b, c, h, w = 2, 17, 6, 4
    cond = torch.cat([latents, 1 - F.interpolate((mask > 0.5).float(), size=(h, w))], dim=1)
    expected = cond.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    ours = control_condition(latents, INPAINT, mask_to_latent(mask, h, w))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # token (i, j), mask channel ph*2+pw = 1 - mask pixel at the top-left corner of latent cell (2i+ph, 2j+pw)
    i, j, ph, pw = 1, 0, 1, 1
    pixel = mask[0, 0, 8 * (2 * i + ph), 8 * (2 * j + pw)]
    assert ours[0, i * (w // 2) + j, 64 + ph * 2 + pw] == 1 - (pixel > 0.5).float()


@torch.no_grad()
def test_encode_control_for_inpainting_and_errors():
    ae = random_autoencoder(AE_PRESETS["tiny"], seed=0).eval()
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    cond = encode_control(ae, image, INPAINT, mask)
    blacked = torch.where(mask > 0.5, -1.0, image)
    torch.testing.assert_close(cond[..., :64], S.pack(ae.encode(blacked)))
    assert cond.shape == (1, 16, 68) and set(cond[..., 64:].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="inpainting ControlNet .* needs a mask"):
        encode_control(ae, image, INPAINT)
    with pytest.raises(ValueError, match="takes none"):
        encode_control(ae, image, tiny_controlnet_params(), mask)
    plain = encode_control(ae, image, tiny_controlnet_params())
    torch.testing.assert_close(plain, S.pack(ae.encode(image)))

    cn = tiny.random_controlnet(INPAINT, seed=0).eval()
    x = controlnet_inputs(INPAINT, batch=1, lat_h=8, lat_w=8)
    other = cond.clone()
    other[..., 64:] = 1 - other[..., 64:]  # same latents, inverted mask: the mask channels matter
    assert rel_err(flat(cn(**{**x, "control": other})), flat(cn(**{**x, "control": cond}))) > 1e-3
    with pytest.raises(ValueError, match=r"takes \[B, N, 68\] \(64 latent channels \+ 4 mask channels\)"):
        cn(**{**x, "control": cond[..., :64]})
