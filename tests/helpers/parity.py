"""diffusers as the reference implementation: the one BFL -> diffusers forward-argument map, diffusers'
model parts holding our pipeline's weights, and diffusers' own LoRA loader. diffusers is imported only when a
helper runs (``pytest.importorskip``); the tests using them skip without it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from flux_lora.weights.keymaps import (
    ae_to_diffusers,
    ae_to_diffusers_config,
    flux_to_diffusers,
    flux_to_diffusers_config,
)


def diffusers_kwargs(x: dict) -> dict:
    """:func:`helpers.dit.dit_inputs` (or ``controlnet_inputs``) under diffusers' argument names, as its
    ``FluxTransformer2DModel`` and ``FluxControlNetModel`` take them: ids without the batch dimension."""
    return dict(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
        return_dict=False,
    )


@torch.no_grad()
def diffusers_forward(model, x: dict) -> torch.Tensor:
    """Run diffusers' FluxTransformer2DModel on :func:`helpers.dit.dit_inputs` (no gradients)."""
    return model(**diffusers_kwargs(x))[0]


def diffusers_parts(pipe) -> dict:
    """diffusers' scheduler (FLUX.1-dev's or -schnell's config), VAE and transformer holding the weights of our
    ``FluxPipeline``: the model parts of diffusers' Flux pipelines."""
    diffusers = pytest.importorskip("diffusers")
    p = pipe.dit.params
    transformer = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(p))
    transformer.load_state_dict(flux_to_diffusers(pipe.dit.state_dict(), p), strict=True)
    vae = diffusers.AutoencoderKL(**ae_to_diffusers_config(pipe.ae.params))
    vae.load_state_dict(ae_to_diffusers(pipe.ae.state_dict(), pipe.ae.params), strict=True)
    dev = p.guidance_embed
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=dev,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0 if dev else 1.0,
    )
    return dict(scheduler=scheduler, vae=vae, transformer=transformer)


def transformer_pipeline(transformer):
    """diffusers' FluxPipeline around a transformer only: enough for its ``load_lora_weights``."""
    diffusers = pytest.importorskip("diffusers")
    return diffusers.FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def load_with_diffusers(pipe, path: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """``pipe.load_lora_weights(path)``; diffusers' warnings (but the one about the absent text encoder)."""
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            pipe.load_lora_weights(str(path))
    finally:
        diffusers.utils.logging.disable_propagation()
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("diffusers") and r.levelno >= logging.WARNING and "text_encoder" not in r.getMessage()
    ]


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The LoRA diffusers loaded into ``model`` (it names the adapter it loads ``default_0``)."""
    from peft.utils import get_peft_model_state_dict

    (name,) = model.peft_config
    return get_peft_model_state_dict(model, adapter_name=name)
