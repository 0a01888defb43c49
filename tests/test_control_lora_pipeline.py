"""A BFL control LoRA in FluxPipeline (tiny, float32, CPU): a whole run with a structure image equals diffusers'
FluxControlPipeline on a transformer whose x_embedder takes 128 channels, and the image is checked."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flux_lora.inference import pipeline as pipeline_module
from flux_lora.lora.files import read_lora
from flux_lora.lora.runtime import apply_loras, remove_loras
from flux_lora.sampling import pack
from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config
from flux_lora.weights.loading import flux_params

from helpers.cli import load_generate
from helpers.lora import control_lora
from helpers.numerics import rel_err
from helpers.parity import diffusers_parts

H, W = 32, 48
KW = dict(height=H, width=W, num_inference_steps=3, output_type="latent", progress=False, guidance=3.5)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def _diffusers_control_pipeline(pipe, dit):
    diffusers = pytest.importorskip("diffusers")
    parts = diffusers_parts(pipe)
    p = dit.params
    transformer = diffusers.FluxTransformer2DModel(**(flux_to_diffusers_config(p) | {"in_channels": 2 * p.in_channels}))
    transformer.load_state_dict(flux_to_diffusers(dit.state_dict(), p), strict=True)
    nones = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    return diffusers.FluxControlPipeline(**nones, **(parts | {"transformer": transformer}))


def test_structure_image_run_matches_diffusers_flux_control_pipeline(dev_pipe, monkeypatch):
    from diffusers.models.autoencoders import vae as vae_module

    # FluxControlPipeline samples the autoencoder's posterior; we take its mean
    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    lora = read_lora(control_lora(seed=3), dev_pipe.dit.params)
    fused = copy.deepcopy(dev_pipe.dit)  # the reference gets the LoRA fused in float32 (norms and img_in too)
    apply_loras(fused, [(lora, 0.8, "canny")], mode="fused")
    theirs = _diffusers_control_pipeline(dev_pipe, fused)
    emb = dev_pipe.encode(["a house", "a car"])
    noise = pack(dev_pipe.noise(2, H // 8, W // 8, torch.Generator().manual_seed(0)))
    control = _image(1)
    ref = theirs(
        prompt_embeds=emb.txt,
        pooled_prompt_embeds=emb.y,
        control_image=control,
        latents=noise,
        guidance_scale=3.5,
        height=H,
        width=W,
        num_inference_steps=KW["num_inference_steps"],
        max_sequence_length=dev_pipe.dit.params.max_sequence_length,
        output_type="latent",
    ).images
    kw = dict(text_embeddings=emb, latents=noise, **KW)
    plain = dev_pipe(**kw)
    apply_loras(dev_pipe.dit, [(lora, 0.8, "canny")])  # unfused here
    try:
        with pytest.raises(ValueError, match="pass control_image"):
            dev_pipe(**kw)
        ours = dev_pipe(control_image=control, **kw)
        other = dev_pipe(control_image=_image(2), **kw)
    finally:
        remove_loras(dev_pipe.dit)
    assert rel_err(pack(ours), ref) < 1e-5
    assert (ours - other).abs().max() > 1e-3  # the structure image steers the run
    assert (ours - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs a DiT whose img_in takes image \\+ structure latents"):
        dev_pipe(control_image=control, **kw)


@pytest.fixture
def no_dit(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the DiT was loaded before the bad input was reported")

    monkeypatch.setattr(pipeline_module, "load_flow_model", refuse)


ARGS = ["--prompt", "a house", "--height", "32", "--width", "48", "--steps", "2"]
ARGS += ["--dtype", "float32", "--device", "cpu", "--quiet", "--seed", "3"]


def _files(tiny_dev_dir, tmp_path):
    lora, image = tmp_path / "canny.safetensors", tmp_path / "edges.png"
    save_file(control_lora(p=flux_params(tiny_dev_dir)), str(lora))
    _image(4).save(image)
    return lora, image


def test_generate_needs_a_structure_image_exactly_with_a_control_lora(tiny_dev_dir, tmp_path, no_dit, caplog):
    lora, image = _files(tiny_dev_dir, tmp_path)
    generate = load_generate()
    base = ["--model", str(tiny_dev_dir), *ARGS, "--output", str(tmp_path / "x.png")]
    assert generate.cli([*base, "--lora", str(lora)]) == 1
    assert "canny is a FLUX control LoRA (Canny/Depth): give --structure-image" in caplog.text
    caplog.clear()
    assert generate.cli([*base, "--structure-image", str(image)]) == 1
    assert "no --lora is a FLUX control LoRA" in caplog.text


def test_generate_with_a_structure_image(tiny_dev_dir, tmp_path):
    lora, image = _files(tiny_dev_dir, tmp_path)
    generate = load_generate()
    base = ["--model", str(tiny_dev_dir), *ARGS, "--lora", str(lora)]
    (a,) = generate.main([*base, "--structure-image", str(image), "--output", str(tmp_path / "a.png")])
    _image(5).save(image)
    (b,) = generate.main([*base, "--structure-image", str(image), "--output", str(tmp_path / "b.png")])
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert '"structure_image"' in Image.open(a).text["flux_lora"]
