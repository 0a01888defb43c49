"""Image to image through the pipeline call: strength 0 is the autoencoder round trip, 1 is text to image."""

from __future__ import annotations

import pytest
import torch

from flux_lora.inference.control import control_pixels
from flux_lora.inference.img2img import cut_schedule
from flux_lora.inference.pipeline import FluxPipeline

KW = dict(height=32, width=48, num_inference_steps=4, progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_dev_dir) -> FluxPipeline:
    return FluxPipeline.from_pretrained(tiny_dev_dir, dtype=torch.float32, device="cpu")


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(seed))


def test_strength_one_is_text_to_image_for_the_same_seed(pipe):
    txt2img = pipe("a dog", seed=7, output_type="latent", **KW)
    img2img = pipe("a dog", seed=7, output_type="latent", image=_image(), strength=1.0, **KW)
    assert torch.equal(img2img, txt2img)


def test_strength_zero_returns_the_input_through_the_autoencoder(pipe):
    image = _image(1)
    calls = []
    out = pipe("a dog", seed=7, output_type="pt", image=image, strength=0.0, callback=lambda *a: calls.append(a), **KW)
    assert calls == []  # no DiT step
    with torch.no_grad():
        round_trip = pipe.decode(pipe.ae.encode(control_pixels(image, 32, 48)))
    torch.testing.assert_close(out, round_trip, rtol=0, atol=0)


# diffusers' rule: steps - int(steps - steps * strength)
@pytest.mark.parametrize("strength, steps", [(0.5, 2), (0.6, 3), (0.75, 3), (1.0, 4), (0.2, 1), (0.1, 1)])
def test_strength_keeps_the_last_steps(pipe, strength, steps):
    calls = []
    pipe(
        "a dog",
        seed=7,
        output_type="latent",
        image=_image(),
        strength=strength,
        callback=lambda *a: calls.append(a[1]),
        **KW,
    )
    schedule = pipe.timesteps(32, 48, 4)
    assert len(calls) == steps and calls == schedule[4 - steps : 4]
    assert cut_schedule(schedule, strength) == schedule[4 - steps :]


def test_one_image_per_prompt_and_bad_input(pipe):
    images = torch.cat([_image(1), _image(2)])
    out = pipe(["a", "b"], seed=0, output_type="latent", image=images, strength=0.0, num_images_per_prompt=2, **KW)
    assert out.shape[0] == 4 and torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    with pytest.raises(ValueError, match="strength must be in"):
        pipe("a", seed=0, image=_image(), strength=1.5, **KW)
    with pytest.raises(ValueError, match="pass an image too"):
        pipe("a", seed=0, strength=0.5, **KW)
    with pytest.raises(ValueError, match="batch of 2 for 3 prompts"):
        pipe(["a", "b", "c"], seed=0, image=images, strength=0.5, **KW)
