"""A BFL control LoRA in FluxPipeline (tiny, float32, CPU): a whole run with a structure image equals diffusers'
FluxControlPipeline on a transformer whose x_embedder takes 128 channels, and the image is checked."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from flux_lora.lora.files import read_lora
from flux_lora.lora.runtime import apply_loras, remove_loras
from flux_lora.sampling import pack
from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config

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
