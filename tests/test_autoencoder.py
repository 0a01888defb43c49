"""The autoencoder against diffusers' AutoencoderKL (16 latent channels, FLUX scale and shift)."""

import pytest
import torch

from flux_lora.model.autoencoder import AE_PRESETS, AutoEncoder
from flux_lora.weights.keymaps import ae_to_diffusers, ae_to_diffusers_config
from flux_lora.weights.loading import load_autoencoder

diffusers = pytest.importorskip("diffusers")
P = AE_PRESETS["tiny"]


def _random_diffusers_vae(seed: int):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**ae_to_diffusers_config(P)).eval()
    with torch.no_grad():
        for name, t in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                t.uniform_(-0.1, 0.1)
    return vae


def test_flux_constants():
    full = AE_PRESETS["flux"]
    assert (full.scale_factor, full.shift_factor, full.z_channels) == (0.3611, 0.1159, 16)
    assert full.downscale_factor == 8 and P.downscale_factor == 8
    with torch.device("meta"):
        n = sum(t.numel() for t in AutoEncoder(full).state_dict().values())
    assert n == 83_819_683  # BFL's FLUX.1 autoencoder (encoder + decoder, no quant convs)


def test_encode_decode_match_diffusers_vae_folder(tmp_path):
    vae = _random_diffusers_vae(0)
    vae.save_pretrained(tmp_path / "vae", max_shard_size="400KB")
    ours = load_autoencoder(tmp_path, dtype=torch.float32)  # finds vae/ and converts the names
    assert ours.params == P
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        z_ref = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        z = ours.encode(x)
        assert z.shape == (2, 16, 6, 8)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
        img_ref = vae.decode(z_ref / vae.config.scaling_factor + vae.config.shift_factor).sample
        torch.testing.assert_close(ours.decode(z_ref), img_ref, rtol=1e-5, atol=1e-5)


def test_ae_safetensors_roundtrip_into_diffusers(tiny_dev_dir):
    ours = load_autoencoder(tiny_dev_dir / "ae.safetensors", dtype=torch.float32)
    vae = diffusers.AutoencoderKL(**ae_to_diffusers_config(ours.params)).eval()
    vae.load_state_dict(ae_to_diffusers(ours.state_dict(), ours.params), strict=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode(x), (vae.encode(x).latent_dist.mode() - 0.1159) * 0.3611, rtol=1e-5, atol=1e-5
        )


def test_sampled_latents_differ_from_mean():
    torch.manual_seed(0)
    ae = AutoEncoder(P).eval()
    x = torch.rand(1, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(ae.encode(x, sample=True, generator=g), ae.encode(x))
