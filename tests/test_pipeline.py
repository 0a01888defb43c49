"""FluxPipeline on the tiny model folders, float32 on the CPU, against diffusers and analytic values."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from flux_lora.inference.denoise import DiTInputs, denoise
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.model.flux import ControlResiduals
from flux_lora.model.fp8 import FP8Linear
from flux_lora.sampling import img_ids, pack, txt_ids

from helpers.parity import diffusers_parts

H, W = 64, 96  # latent 8x12, 24 image tokens


def _noise(pipe: FluxPipeline, batch: int, seed: int = 0) -> torch.Tensor:
    return pack(pipe.noise(batch, H // 8, W // 8, torch.Generator().manual_seed(seed)))


def _diffusers_pipeline(pipe: FluxPipeline):
    """diffusers' FluxPipeline holding our weights, with FLUX.1-dev's or -schnell's scheduler config."""
    diffusers = pytest.importorskip("diffusers")
    return diffusers.FluxPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, **diffusers_parts(pipe)
    )


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_matches_diffusers(variant, dev_pipe, schnell_pipe):
    pipe = dev_pipe if variant == "dev" else schnell_pipe
    theirs = _diffusers_pipeline(pipe)
    emb = pipe.encode(["a photo of a dog", "red car at night"])
    noise = _noise(pipe, 2)
    kw = dict(height=H, width=W, num_inference_steps=4)
    ref_kw = dict(
        prompt_embeds=emb.txt,
        pooled_prompt_embeds=emb.y,
        latents=noise,
        guidance_scale=3.5,
        max_sequence_length=pipe.dit.params.max_sequence_length,
        **kw,
    )

    ours = pipe(text_embeddings=emb, latents=noise, output_type="latent", progress=False, **kw)
    ref = theirs(output_type="latent", **ref_kw).images
    assert (pack(ours) - noise).abs().max() > 1  # the sampler moved far from the noise
    torch.testing.assert_close(pack(ours), ref, atol=1e-5, rtol=1e-5)
    # diffusers' scheduler ran the same schedule (it appends the final 0)
    expected = pipe.timesteps(H, W, 4)
    torch.testing.assert_close(
        theirs.scheduler.sigmas.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
    )
    if variant == "schnell":
        assert expected == [1.0, 0.75, 0.5, 0.25, 0.0]

    ours_img = pipe(text_embeddings=emb, latents=noise, output_type="pt", progress=False, **kw)
    ref_img = theirs(output_type="pt", **ref_kw).images
    assert ((ours_img > 0) & (ours_img < 1)).float().mean() > 0.5  # not a saturated image
    torch.testing.assert_close(ours_img, ref_img, atol=2e-5, rtol=1e-5)


def test_schedule_check_values(dev_pipe, schnell_pipe):
    # lora-formats-and-architecture.md, section 6.4
    check_1024, check_512 = [1.0, 0.904531, 0.759511, 0.512844, 0.0], [1.0, 0.849235, 0.652489, 0.384945, 0.0]
    assert dev_pipe.timesteps(1024, 1024, 4) == pytest.approx(check_1024, abs=1e-6)
    assert dev_pipe.timesteps(512, 512, 4) == pytest.approx(check_512, abs=1e-6)
    assert schnell_pipe.timesteps(1024, 1024, 4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert schnell_pipe.dit.params.default_steps == 4


def test_model_called_at_schedule_times_with_guidance(dev_pipe):
    seen = []
    hook = dev_pipe.dit.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["timesteps"][0].item(), kwargs["guidance"][0].item())),
        with_kwargs=True,
    )
    try:
        dev_pipe(
            "a cat",
            height=H,
            width=W,
            num_inference_steps=3,
            guidance=2.5,
            seed=0,
            output_type="latent",
            progress=False,
        )
    finally:
        hook.remove()
    assert [t for t, _ in seen] == pytest.approx(dev_pipe.timesteps(H, W, 3)[:-1], abs=1e-7)
    assert {g for _, g in seen} == {2.5}


def test_true_cfg_is_the_analytic_combination(dev_pipe):
    pos, neg = dev_pipe.encode("a red car"), dev_pipe.encode("blurry")
    noise = _noise(dev_pipe, 1)
    kw = dict(height=H, width=W, num_inference_steps=1, latents=noise, output_type="latent", progress=False)
    out = dev_pipe(text_embeddings=pos, negative_text_embeddings=neg, true_cfg=4.0, **kw)
    plain = dev_pipe(text_embeddings=pos, **kw)

    def velocity(emb):
        return dev_pipe.dit(
            img=noise,
            img_ids=img_ids(1, H // 8, W // 8),
            txt=emb.txt,
            txt_ids=txt_ids(1, emb.txt.shape[1]),
            timesteps=torch.ones(1),
            y=emb.y,
            guidance=torch.full((1,), 3.5),
        )

    with torch.no_grad():
        v, v_neg = velocity(pos), velocity(neg)
    expected = noise - (v_neg + 4.0 * (v - v_neg))  # one Euler step from t=1 to t=0
    torch.testing.assert_close(pack(out), expected, atol=1e-5, rtol=1e-5)
    assert (out - plain).abs().max() > 1e-2
    # the prompt-side call gave the plain result
    torch.testing.assert_close(pack(plain), noise - v, atol=1e-5, rtol=1e-5)


def test_true_cfg_default_negative_is_the_empty_prompt(dev_pipe):
    kw = dict(height=32, width=32, num_inference_steps=2, seed=3, output_type="latent", progress=False)
    a = dev_pipe("a dog", true_cfg=2.0, **kw)
    b = dev_pipe("a dog", true_cfg=2.0, negative_prompt="", **kw)
    c = dev_pipe("a dog", true_cfg=2.0, negative_prompt="a cat", **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_several_images_per_prompt_are_prompt_major(dev_pipe):
    prompts = ["a dog", "a cat"]
    noise = _noise(dev_pipe, 4, seed=1)
    kw = dict(height=H, width=W, num_inference_steps=2, output_type="latent", progress=False)
    out = dev_pipe(prompts, num_images_per_prompt=2, latents=noise, **kw)
    assert out.shape == (4, 16, H // 8, W // 8)
    for i, j in [(0, 0), (1, 0), (2, 1), (3, 1)]:  # row i belongs to prompt j
        single = dev_pipe(prompts[j], latents=noise[i : i + 1], **kw)
        torch.testing.assert_close(out[i : i + 1], single, atol=1e-5, rtol=1e-5)
    drawn = dev_pipe(
        "a dog", num_images_per_prompt=3, seed=0, height=32, width=32, output_type="latent", progress=False
    )
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])


def test_seed_determinism(dev_pipe):
    kw = dict(height=32, width=48, num_inference_steps=2, progress=False)
    a = dev_pipe("a dog", seed=7, output_type="pt", **kw)
    b = dev_pipe("a dog", seed=7, output_type="pt", **kw)
    c = dev_pipe("a dog", generator=torch.Generator().manual_seed(7), output_type="pt", **kw)
    d = dev_pipe("a dog", seed=8, output_type="pt", **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert (a - d).abs().max() > 1e-2
    images = dev_pipe("a dog", seed=7, **kw)
    assert images[0].size == (48, 32) and images[0].mode == "RGB"
    assert torch.equal(torch.from_numpy(np.array(images[0])), (a[0] * 255).round().byte().permute(1, 2, 0))


def test_size_is_rounded_down_to_multiples_of_16(dev_pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="flux_lora.inference.pipeline"):
        images = dev_pipe("a dog", height=70, width=50, num_inference_steps=1, seed=0, progress=False)
    assert images[0].size == (48, 64)
    assert "rounded down to 48x64" in caplog.text


def test_bad_input_errors(dev_pipe):
    kw = dict(num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="smaller than 16x16"):
        dev_pipe("a dog", height=8, width=64, **kw)
    with pytest.raises(ValueError, match="output_type"):
        dev_pipe("a dog", height=32, width=32, output_type="np", **kw)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        dev_pipe("a dog", height=32, width=32, num_images_per_prompt=0, **kw)
    with pytest.raises(ValueError, match="not both"):
        dev_pipe("a dog", text_embeddings=dev_pipe.encode("a dog"), height=32, width=32, **kw)
    with pytest.raises(ValueError, match="not both"):
        dev_pipe(height=32, width=32, **kw)
    with pytest.raises(ValueError, match="seed or generator"):
        dev_pipe("a dog", height=32, width=32, seed=1, generator=torch.Generator(), **kw)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 16, 2, 2\)"):
        dev_pipe("a dog", height=32, width=32, latents=torch.zeros(1, 16, 2, 2), **kw)
    with pytest.raises(ValueError, match="num_steps"):
        dev_pipe("a dog", height=32, width=32, num_inference_steps=-1, progress=False)
    with pytest.raises(ValueError, match="guidance"):
        dev_pipe("a dog", height=32, width=32, guidance=float("nan"), **kw)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        dev_pipe("a dog", height=32, width=32, true_cfg=2.0, negative_prompt=["a", "b"], **kw)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        FluxPipeline.from_pretrained("no-such-model", device="cpu")


def test_from_pretrained_resolves_a_modelscope_id(tiny_dev_dir, monkeypatch):
    import flux_lora.weights.hub as hub

    calls = []

    def download(model_id, **kwargs):
        calls.append((model_id, kwargs["allow_patterns"]))
        return str(tiny_dev_dir)

    monkeypatch.setattr(hub, "_modelscope_download", download)
    pipe = FluxPipeline.from_pretrained("AI-ModelScope/FLUX.1-dev", dtype=torch.float32, device="cpu")
    assert calls[0][0] == "AI-ModelScope/FLUX.1-dev" and "ae.safetensors" in calls[0][1]
    assert pipe.dit.params.guidance_embed
    with pytest.raises(ValueError, match="is a file"):
        FluxPipeline.from_pretrained(tiny_dev_dir / "ae.safetensors", device="cpu")


def test_schnell_ignores_guidance_with_a_warning(schnell_pipe, caplog):
    kw = dict(height=32, width=32, seed=0, output_type="latent", progress=False)
    with caplog.at_level(logging.WARNING, logger="flux_lora.inference.pipeline"):
        a = schnell_pipe("a dog", guidance=7.0, **kw)
    assert "guidance=7.0 is ignored" in caplog.text
    assert torch.equal(a, schnell_pipe("a dog", **kw))


def test_precomputed_embeddings_need_no_text_encoders(dev_pipe):
    emb = dev_pipe.encode(["a dog"])
    bare = FluxPipeline(dev_pipe.dit, dev_pipe.ae, None, device="cpu")
    kw = dict(height=32, width=32, num_inference_steps=2, seed=0, output_type="latent", progress=False)
    assert torch.equal(bare(text_embeddings=emb, **kw), dev_pipe("a dog", **kw))
    with pytest.raises(ValueError, match="no text encoders"):
        bare("a dog", **kw)


def test_control_provider_is_called_per_dit_call(dev_pipe):
    calls: list[DiTInputs] = []
    hidden = dev_pipe.dit.params.hidden_size

    def zero(inputs: DiTInputs) -> ControlResiduals:
        calls.append(inputs)
        return ControlResiduals(double=[torch.zeros(1, inputs.img.shape[1], hidden)])

    kw = dict(height=32, width=32, num_inference_steps=2, seed=0, output_type="latent", progress=False)
    base = dev_pipe("a dog", true_cfg=2.0, **kw)
    assert torch.equal(dev_pipe("a dog", true_cfg=2.0, controls=zero, **kw), base)
    assert [(c.step, c.negative) for c in calls] == [(0, False), (0, True), (1, False), (1, True)]
    # (a constant residual would vanish in the LayerNorms that follow: use a random one)
    residual = torch.randn(1, 4, hidden, generator=torch.Generator().manual_seed(0))
    some = lambda inputs: ControlResiduals(single=[residual])  # noqa: E731
    assert (dev_pipe("a dog", true_cfg=2.0, controls=some, **kw) - base).abs().max() > 1e-3


def test_denoise_is_the_euler_loop(dev_pipe):
    """denoise() with a velocity that is constant in x integrates exactly: x_end = x0 - (t0 - t_end) v."""

    class Constant(torch.nn.Module):
        def forward(self, img, **kwargs):
            return torch.full_like(img, 0.5)

    img = torch.randn(1, 4, 64)
    out = denoise(Constant(), img, None, torch.zeros(1, 2, 8), None, None, [1.0, 0.6, 0.1], None)
    torch.testing.assert_close(out, img - 0.9 * 0.5)


def test_fp8_pipeline(tiny_dev_dir, dev_pipe):
    pipe = FluxPipeline.from_pretrained(tiny_dev_dir, quantize="float8_e4m3fn", dtype=torch.float32, device="cpu")
    assert isinstance(pipe.dit.double_blocks[0].img_attn.qkv, FP8Linear)
    assert pipe.dit.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    kw = dict(height=32, width=32, num_inference_steps=2, seed=0, output_type="pt", progress=False)
    a, ref = pipe("a dog", **kw), dev_pipe("a dog", **kw)
    assert not torch.equal(a, ref)
    assert (a - ref).abs().mean() < 0.05  # fp8 storage error only
