"""ControlNets in FluxPipeline (tiny folders, float32, CPU): whole denoising runs against diffusers'
FluxControlNetPipeline, step windows, true CFG, LoRAs, memory modes, inpainting, fp8, and bad input."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from flux_lora.inference.control import ControlNetUnit, control_pixels
from flux_lora.inference.offload import location
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.lora.runtime import apply_loras, remove_loras
from flux_lora.model.controlnet import ControlNetParams, FluxControlNet, encode_control
from flux_lora.model.fp8 import FP8, FP8Linear
from flux_lora.sampling import pack
from flux_lora.weights.controlnet_loading import load_controlnet
from flux_lora.weights.tiny import tiny_controlnet_params, write_tiny_controlnet

from helpers.lora import random_lora
from helpers.offload import FakeAccelerator, realign, while_each_block_runs
from helpers.parity import diffusers_parts

H, W = 32, 48  # latent 4x6: 6 image tokens
KW = dict(height=H, width=W, num_inference_steps=4, output_type="latent", progress=False)


def _image(seed: int, width: int = W, height: int = H) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    """``[1, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def cns(dev_pipe, tiny_controlnet_dir, tiny_union_controlnet_dir, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("controlnets")
    inpaint = write_tiny_controlnet(tmp / "inpaint", seed=2, params=tiny_controlnet_params(inpainting=True))
    folders = {
        "plain": tiny_controlnet_dir,
        "union": tiny_union_controlnet_dir,
        "inpaint": inpaint,
        "plain2": write_tiny_controlnet(tmp / "plain2", seed=5),
    }
    return {name: realign(dev_pipe.load_controlnet(f)) for name, f in folders.items()} | {"folders": folders}


@pytest.fixture(scope="module")
def emb(dev_pipe):
    return dev_pipe.encode(["a house by a lake", "a red car"])


def _noise(pipe: FluxPipeline, batch: int = 2) -> torch.Tensor:
    return pack(pipe.noise(batch, H // 8, W // 8, torch.Generator().manual_seed(0)))


class Calls:
    """Counts forward calls of modules (and records their keyword arguments)."""

    def __init__(self, *modules: torch.nn.Module):
        self.kwargs: list[dict] = []
        self._hooks = [m.register_forward_pre_hook(self._record, with_kwargs=True) for m in modules]

    def _record(self, module, args, kwargs) -> None:
        self.kwargs.append(kwargs)

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()


# ------------------------------------------------------------------------------------------ diffusers parity

# (ControlNet, image, mode, scale, start, end) per unit; images: an int is a random image at the output size
# given to diffusers as a [-1, 1] tensor, a (seed, w, h) tuple a PIL image that both pipelines resize. Several
# ControlNets have the same block counts here: for different ones, combine_residuals keeps each one's interval
# rule where diffusers truncates (test_controlnet.py).
CASES = {
    "one, true CFG": ("dev", [("plain", 1, None, 0.8, 0.0, 0.6)], False, 2.0),
    "two": ("dev", [("plain", (2, W, H), None, 0.7, 0.3, 1.0), ("plain2", 3, None, 1.2, 0.0, 0.6)], True, 1.0),
    "union, two modes": (
        "dev",
        [("union", 4, "canny", 0.6, 0.0, 1.0), ("union", (5, 24, 16), "tile", 0.9, 0.0, 1.0)],
        True,
        1.0,
    ),
    "dev ControlNet, schnell DiT": ("schnell", [("plain", 6, None, 1.0, 0.0, 1.0)], False, 1.0),
}


def _diffusers_pipeline(pipe: FluxPipeline, folders: list, multi: bool):
    diffusers = pytest.importorskip("diffusers")
    refs = [diffusers.FluxControlNetModel.from_pretrained(f, torch_dtype=torch.float32).eval() for f in folders]
    controlnet = diffusers.FluxMultiControlNetModel(refs) if multi else refs[0]
    return diffusers.FluxControlNetPipeline(
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        controlnet=controlnet,
        **diffusers_parts(pipe),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_denoising_matches_diffusers_controlnet_pipeline(case, dev_pipe, schnell_pipe, cns, emb, monkeypatch):
    """Whole runs equal diffusers' FluxControlNetPipeline (FluxMultiControlNetModel for several, and for one
    union model given two modes) from the same noise and text embeddings: resizing, encoding, modes, scales,
    windows, guidance for a dev ControlNet on schnell, and true CFG with the positive residuals reused."""
    variant, specs, multi, true_cfg = CASES[case]
    pipe = dev_pipe if variant == "dev" else schnell_pipe
    from diffusers.pipelines.flux import pipeline_flux_controlnet as ref_module

    # diffusers samples the autoencoder's posterior; we take its mean
    monkeypatch.setattr(
        ref_module, "retrieve_latents", functools.partial(ref_module.retrieve_latents, sample_mode="argmax")
    )
    units, ref_images = [], []
    for name, image, mode, scale, start, end in specs:
        if isinstance(image, tuple):
            ours = ref = _image(*image)
        else:
            ours = _tensor(_image(image))
            ref = control_pixels(ours, H, W)  # diffusers takes tensors as they are: [-1, 1], output size
        units.append(ControlNetUnit(cns[name], ours, mode=mode, scale=scale, start=start, end=end))
        ref_images.append(ref)
    names = list(dict.fromkeys(name for name, *_ in specs))
    theirs = _diffusers_pipeline(pipe, [cns["folders"][n] for n in names], multi)
    modes = [{"canny": 0, "tile": 1, "depth": 2}.get(m) for _, _, m, *_ in specs]
    neg = pipe.encode(["blurry", "dark"]) if true_cfg != 1.0 else None
    ref_kw = dict(
        control_image=ref_images if multi else ref_images[0],
        control_mode=modes if multi else modes[0],
        controlnet_conditioning_scale=[s[3] for s in specs],
        control_guidance_start=[s[4] for s in specs],
        control_guidance_end=[s[5] for s in specs],
    )
    if neg is not None:
        ref_kw.update(negative_prompt_embeds=neg.txt, negative_pooled_prompt_embeds=neg.y, true_cfg_scale=true_cfg)
    noise = _noise(pipe)
    ref = theirs(
        prompt_embeds=emb.txt,
        pooled_prompt_embeds=emb.y,
        latents=noise,
        guidance_scale=3.5,
        max_sequence_length=pipe.dit.params.max_sequence_length,
        height=H,
        width=W,
        num_inference_steps=KW["num_inference_steps"],
        output_type="latent",
        **ref_kw,
    ).images
    kw = dict(text_embeddings=emb, negative_text_embeddings=neg, true_cfg=true_cfg, latents=noise, guidance=3.5, **KW)
    ours = pipe(controlnets=units, **kw)
    torch.testing.assert_close(pack(ours), ref, atol=1e-5, rtol=1e-5)
    assert (ours - pipe(**kw)).abs().max() > 1e-2  # the ControlNets steered the run


# ------------------------------------------------------------------------------------------ windows, CFG


@pytest.mark.parametrize(("start", "end", "steps"), [(0.0, 0.5, [0, 1]), (0.5, 1.0, [2, 3]), (0.3, 0.8, [2])])
def test_window_runs_the_controlnet_only_inside_it(start, end, steps, dev_pipe, cns, emb):
    cn, image = cns["plain"], _image(7)
    with Calls(cn) as calls:
        out = dev_pipe(
            text_embeddings=emb, controlnets=[ControlNetUnit(cn, image, scale=0.8, start=start, end=end)], seed=0, **KW
        )
    schedule = dev_pipe.timesteps(H, W, 4)
    assert [c["timesteps"][0].item() for c in calls.kwargs] == pytest.approx([schedule[i] for i in steps])
    control = encode_control(dev_pipe.ae, control_pixels(image, H, W), cn.params).expand(2, -1, -1)

    def every_step(x):  # the ControlNet at every step, at scale 0 outside the window
        return cn(
            img=x.img,
            img_ids=x.img_ids,
            txt=x.txt,
            txt_ids=x.txt_ids,
            timesteps=x.timesteps,
            y=x.y,
            control=control,
            guidance=x.guidance,
            scale=0.8 if x.step in steps else 0.0,
        )

    assert torch.equal(out, dev_pipe(text_embeddings=emb, controls=every_step, seed=0, **KW))
    always = dev_pipe(text_embeddings=emb, controlnets=[ControlNetUnit(cn, image, scale=0.8)], seed=0, **KW)
    assert (out - always).abs().max() > 1e-3


def test_true_cfg_reuses_the_positive_residuals(dev_pipe, cns, emb):
    neg = dev_pipe.encode(["blurry", "dark"])
    units = [ControlNetUnit(cns["plain"], _image(8), scale=0.8), ControlNetUnit(cns["union"], _image(9), mode="pose")]
    with Calls(dev_pipe.dit) as dit, Calls(cns["plain"], cns["union"]) as controlnet:
        dev_pipe(
            text_embeddings=emb,
            negative_text_embeddings=neg,
            true_cfg=3.0,
            controlnets=units,
            seed=0,
            **{**KW, "num_inference_steps": 3},
        )
    assert len(dit.kwargs) == 6 and len(controlnet.kwargs) == 3 * 2  # ControlNets on positive calls only
    for step in range(3):
        positive, negative = dit.kwargs[2 * step], dit.kwargs[2 * step + 1]
        assert torch.equal(negative["txt"], neg.txt) and positive["controls"] is not None
        assert negative["controls"] is positive["controls"]


# ------------------------------------------------------------------------------------------ LoRA, fp8


def test_lora_on_the_dit_only_with_a_controlnet(dev_pipe, cns, emb):
    cn = cns["plain"]
    paths = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"]
    assert all(cn.get_submodule(p) is not None for p in paths)  # the ControlNet has layers at these paths
    lora, scale = random_lora(dev_pipe.dit, paths), 0.7
    weights = {k: v.clone() for k, v in cn.state_dict().items()}
    kw = dict(text_embeddings=emb, controlnets=[ControlNetUnit(cn, _image(10), scale=0.8)], seed=0, **KW)
    apply_loras(dev_pipe.dit, [(lora, scale, "style")])
    try:
        assert not any(m._forward_hooks for m in cn.modules())
        out = dev_pipe(**kw)
    finally:
        remove_loras(dev_pipe.dit)
    merged = copy.deepcopy(dev_pipe.dit)
    with torch.no_grad():
        for path, lw in lora.items():
            merged.get_submodule(path).weight += scale * lw.delta()
    expected = FluxPipeline(merged, dev_pipe.ae, None, device="cpu")(**kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - dev_pipe(**kw)).abs().max() > 1e-3  # the LoRA took effect
    state = cn.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in state)


def test_fp8_controlnet_in_the_pipeline(dev_pipe, cns, emb):
    fp8 = dev_pipe.load_controlnet(cns["folders"]["union"], quantize="float8_e4m3fn")
    assert isinstance(fp8.double_blocks[0].img_attn.qkv, FP8Linear)
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype == FP8
    kw = dict(text_embeddings=emb, seed=0, **KW)
    image = _image(11)
    plain = dev_pipe(**kw)
    full = dev_pipe(controlnets=[ControlNetUnit(cns["union"], image, mode="depth")], **kw)
    quantized = dev_pipe(controlnets=[ControlNetUnit(fp8, image, mode="depth")], **kw)
    effect, error = (full - plain).abs().mean().item(), (quantized - full).abs().mean().item()
    assert 0 < error < 0.05 * effect  # measured: 1.1e-3 against 0.44


# ------------------------------------------------------------------------------------------ memory modes


def test_model_offload_loads_controlnets_with_the_dit(dev_pipe, cns, emb):
    plain, union = cns["plain"], cns["union"]
    units = [
        ControlNetUnit(plain, _image(12), scale=0.8),
        ControlNetUnit(union, _image(13), mode="depth", end=0.6),
        ControlNetUnit(union, _image(14), mode="canny", scale=0.5),
    ]
    kw = dict(
        text_embeddings=emb,
        controlnets=units,
        seed=0,
        true_cfg=2.0,
        negative_text_embeddings=dev_pipe.encode(["", ""]),
        **{**KW, "num_inference_steps": 2},
    )
    baseline = dev_pipe(**kw)
    fake, events, seen = FakeAccelerator(), [], {}
    parts = {"dit": dev_pipe.dit, "ae": dev_pipe.ae, "plain": plain, "union": union}

    def snapshot(stage):
        def hook(*args) -> None:
            seen.setdefault(stage, {n: location(m, fake) for n, m in parts.items()})

        return hook

    stages = {
        "encode control": dev_pipe.ae.encoder,
        "ControlNet": plain.double_blocks[0],
        "DiT": dev_pipe.dit.double_blocks[0],
        "decode": dev_pipe.ae.decoder,
    }
    hooks = [m.register_forward_hook(snapshot(stage)) for stage, m in stages.items()]
    try:
        dev_pipe.enable_offload("model", transfer=fake, on_move=lambda *e: events.append(e))
        out = dev_pipe(**{**kw, "output_type": "pt"})
        after = {n: location(m, fake) for n, m in parts.items()}
    finally:
        for h in hooks:
            h.remove()
        dev_pipe.enable_offload(None)
    assert torch.equal(out, dev_pipe.decode(baseline))
    on_device = {"dit": "device", "ae": "host", "plain": "device", "union": "device"}
    assert seen == {
        "encode control": {"dit": "host", "ae": "device", "plain": "host", "union": "host"},
        "ControlNet": on_device,
        "DiT": on_device,
        "decode": {"dit": "host", "ae": "device", "plain": "host", "union": "host"},
    }
    assert after == dict.fromkeys(parts, "host")
    assert events == [
        ("load", "ae"),
        ("unload", "ae"),
        ("load", "dit"),
        ("load", "controlnet.0"),
        ("load", "controlnet.1"),
        ("unload", "controlnet.1"),
        ("unload", "controlnet.0"),
        ("unload", "dit"),
        ("load", "ae"),
        ("unload", "ae"),
    ]


def test_block_offload_streams_controlnet_blocks(dev_pipe, cns, emb):
    cn = cns["union"]
    kw = dict(
        text_embeddings=emb,
        controlnets=[ControlNetUnit(cn, _image(15), mode="tile")],
        seed=0,
        **{**KW, "num_inference_steps": 2},
    )
    baseline = dev_pipe(**kw)
    fake, events, seen = FakeAccelerator(), [], []
    cn_blocks = [*cn.double_blocks, *cn.single_blocks]
    dit_blocks = [*dev_pipe.dit.double_blocks, *dev_pipe.dit.single_blocks]

    def snapshot(i) -> None:
        seen.append(
            (
                i,
                [j for j, b in enumerate(cn_blocks) if location(b, fake) == "device"],
                [j for j, b in enumerate(dit_blocks) if location(b, fake) == "device"],
                location(cn.img_in, fake),
                location(cn.controlnet_blocks, fake),
            )
        )

    hooks = while_each_block_runs(cn, snapshot)
    try:
        dev_pipe.enable_offload("block", transfer=fake, on_move=lambda *e: events.append(e))
        out = dev_pipe(**kw)
        after = location(cn, fake)
    finally:
        for h in hooks:
            h.remove()
        dev_pipe.enable_offload(None)
    assert torch.equal(out, baseline)
    n = len(cn_blocks)
    assert len(seen) == 2 * n  # 2 steps, one ControlNet call each
    for i, cn_on_device, dit_on_device, img_in, projections in seen:
        assert cn_on_device == ([i, i + 1] if i + 1 < n else [i])  # the running block and the next one
        assert dit_on_device == [] and (img_in, projections) == ("device", "device")
    assert after == "host"
    loads = [name for action, name in events if action == "load" and name.startswith("controlnet.0.")]
    assert loads[:n] == [
        f"controlnet.0.{g}.{i}"
        for g, count in (("double_blocks", len(cn.double_blocks)), ("single_blocks", len(cn.single_blocks)))
        for i in range(count)
    ]


# ------------------------------------------------------------------------------------------ inpainting


def test_inpainting_controlnet_with_a_mask(dev_pipe, cns, emb):
    cn = cns["inpaint"]
    image = _image(16)
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[8:24, 16:40] = 255  # white: repaint
    kw = dict(text_embeddings=emb, seed=0, **KW)

    def run(image, mask) -> torch.Tensor:
        return dev_pipe(controlnets=[ControlNetUnit(cn, image, mask=mask, scale=0.9)], **kw)

    out = run(image, Image.fromarray(mask))
    pixels = np.array(image)
    inside, outside = pixels.copy(), pixels.copy()
    inside[10:20, 20:30] = 255 - inside[10:20, 20:30]
    outside[0:6, 0:10] = 255 - outside[0:6, 0:10]
    # the pixels to repaint are blacked out before encoding: what they were does not matter
    assert torch.equal(run(Image.fromarray(inside), Image.fromarray(mask)), out)
    assert (run(Image.fromarray(outside), Image.fromarray(mask)) - out).abs().max() > 1e-3
    assert (run(image, Image.fromarray(255 - mask)) - out).abs().max() > 1e-3  # the mask matters
    assert torch.equal(run(image, torch.from_numpy(mask / 255.0).float()), out)  # tensor mask, [H, W]
    assert (out - dev_pipe(**kw)).abs().max() > 1e-3


def test_control_images_at_the_output_size():
    """16-bit depth maps keep their precision (PIL's RGB conversion would saturate them); masks are resized by
    nearest neighbour, so a coarse mask lands on the same pixel blocks."""
    depth = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 40
    ours = control_pixels(Image.fromarray(depth), H, W)
    expected = torch.from_numpy(depth.astype(np.float32) / 65535).expand(1, 3, H, W) * 2 - 1
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert control_pixels(Image.fromarray(depth[::2, ::2]), H, W).shape == (1, 3, H, W)
    coarse = (np.random.default_rng(0).random((H // 4, W // 4)) > 0.5).astype(np.uint8) * 255
    fine = np.kron(coarse, np.ones((4, 4), dtype=np.uint8))
    for mask in (Image.fromarray(coarse), torch.from_numpy(coarse / 255.0)):
        assert torch.equal(control_pixels(mask, H, W, mask=True)[0, 0], torch.from_numpy(fine / 255.0).float())


# ------------------------------------------------------------------------------------------ bad input


def _bad_unit(case: str, cns: dict, tiny_controlnet_dir) -> tuple[ControlNetUnit, str]:
    image, mask = _image(17), Image.new("L", (W, H), 255)
    other = ControlNetParams(replace(tiny_controlnet_params().trunk, hidden_size=96, num_heads=3))
    units = {
        "image count": (
            ControlNetUnit(cns["plain"], torch.rand(3, 3, H, W)),
            r"controlnets\[1\].image is a batch of 3 for 2 prompts",
        ),
        "unknown mode": (ControlNetUnit(cns["union"], image, mode="sketch"), "unknown union control mode 'sketch'"),
        "no mode": (ControlNetUnit(cns["union"], image), "union ControlNet .* needs a mode"),
        "mode, not union": (ControlNetUnit(cns["plain"], image, mode="canny"), "not a union model"),
        "missing mask": (ControlNetUnit(cns["inpaint"], image), "inpainting ControlNet .* needs a mask"),
        "mask, not inpainting": (ControlNetUnit(cns["plain"], image, mask=mask), "takes none"),
        "another base model": (
            ControlNetUnit(FluxControlNet(other), image),
            r"controlnets\[1\] was built for another base model: hidden size 96",
        ),
        "dtype": (
            ControlNetUnit(load_controlnet(tiny_controlnet_dir, dtype=torch.bfloat16), image),
            "computes in torch.bfloat16, the pipeline in torch.float32",
        ),
        "window": (ControlNetUnit(cns["plain"], image, start=0.5, end=0.5), "0 <= start < end <= 1"),
        "no image": (ControlNetUnit(cns["plain"], None), "no control image"),
        "image shape": (ControlNetUnit(cns["plain"], torch.rand(1, 32, 48)), r"has shape \(1, 32, 48\)"),
        "image range": (ControlNetUnit(cns["plain"], torch.rand(3, 32, 48) * 2 - 1), r"values in \[-1"),
    }
    return units[case]


@pytest.mark.parametrize(
    "case",
    [
        "image count",
        "unknown mode",
        "no mode",
        "mode, not union",
        "missing mask",
        "mask, not inpainting",
        "another base model",
        "dtype",
        "window",
        "no image",
        "image shape",
        "image range",
    ],
)
def test_bad_input_fails_before_any_denoising_step(case, dev_pipe, cns, emb, tiny_controlnet_dir):
    unit, message = _bad_unit(case, cns, tiny_controlnet_dir)
    modules = [dev_pipe.dit, cns["plain"], cns["union"], cns["inpaint"], unit.controlnet]
    with Calls(*modules) as calls, pytest.raises((ValueError, TypeError), match=message):
        dev_pipe(text_embeddings=emb, controlnets=[ControlNetUnit(cns["plain"], _image(18)), unit], seed=0, **KW)
    assert calls.kwargs == []  # neither the DiT nor any ControlNet ran


def test_controlnets_or_a_custom_provider(dev_pipe, cns, emb):
    with pytest.raises(ValueError, match="controlnets or controls, not both"):
        dev_pipe(
            text_embeddings=emb,
            controlnets=[ControlNetUnit(cns["plain"], _image(19))],
            controls=lambda x: None,
            seed=0,
            **KW,
        )


def test_loading_a_controlnet_for_another_base_model(dev_pipe, tmp_path):
    params = ControlNetParams(replace(tiny_controlnet_params().trunk, hidden_size=96, num_heads=3))
    folder = write_tiny_controlnet(tmp_path / "other", params=params)
    with pytest.raises(ValueError, match=r"ControlNet .*other was built for another base model: hidden size 96"):
        dev_pipe.load_controlnet(folder)
