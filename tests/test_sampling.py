"""Schedule, packing and id functions against the reference's check values and diffusers' pipeline helpers."""

import pytest
import torch

from flux_lora import sampling as S


@pytest.mark.parametrize(
    ("seq_len", "shift", "expected"),
    [
        (4096, True, [1.0, 0.904531, 0.759511, 0.512844, 0.0]),  # 1024x1024
        (1024, True, [1.0, 0.849235, 0.652489, 0.384945, 0.0]),  # 512x512
        (4096, False, [1.0, 0.75, 0.5, 0.25, 0.0]),  # schnell
    ],
)
def test_schedule_check_values(seq_len, shift, expected):
    assert S.get_schedule(4, seq_len, shift=shift) == pytest.approx(expected, abs=1e-6)


def test_resolution_shift_check_values():
    assert S.resolution_shift(4096) == pytest.approx(1.15)
    assert S.resolution_shift(1024) == pytest.approx(0.63, abs=1e-3)
    assert S.resolution_shift(256) == pytest.approx(0.5)
    h, w = S.latent_size(1024, 1024)
    assert (h, w) == (128, 128) and S.image_seq_len(h, w) == 4096


def test_schedule_properties():
    for n in (1, 4, 28, 50):
        for seq_len in (256, 1024, 4096):
            t = S.get_schedule(n, seq_len)
            assert t[0] == pytest.approx(1.0) and t[-1] == 0.0 and len(t) == n + 1
            assert all(a > b for a, b in zip(t, t[1:], strict=False))
    # larger images shift the schedule toward noise
    assert S.get_schedule(4, 4096)[2] > S.get_schedule(4, 1024)[2] > S.get_schedule(4, 256)[2]


def test_schedule_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    n, seq_len = 28, 4096
    sigmas = [1.0 - i / n for i in range(n)]  # diffusers' FluxPipeline passes linspace(1, 1/n, n)
    sched.set_timesteps(sigmas=sigmas, mu=S.resolution_shift(seq_len))
    assert sched.sigmas.tolist() == pytest.approx(S.get_schedule(n, seq_len), abs=1e-6)


def test_pack_unpack_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.FluxPipeline
    lat = torch.randn(2, 16, 6, 10)
    ours = S.pack(lat)
    assert torch.equal(ours, pipe._pack_latents(lat, 2, 16, 6, 10))
    assert torch.equal(S.unpack(ours, 6, 10), lat)
    assert torch.equal(pipe._unpack_latents(ours, 48, 80, 8), lat)
    ids = S.img_ids(2, 6, 10)
    assert ids.shape == (2, 15, 3)
    assert torch.equal(ids[0], pipe._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert torch.equal(S.txt_ids(2, 7), torch.zeros(2, 7, 3))


def test_pack_channel_order():
    lat = torch.arange(16 * 4).float().reshape(1, 16, 2, 2)
    tok = S.pack(lat)
    # channel index = c*4 + ph*2 + pw
    assert tok[0, 0, 5 * 4 + 1 * 2 + 0] == lat[0, 5, 1, 0]


def test_noise_and_target():
    x0, noise = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(S.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(S.add_noise(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.25, 0.5, 0.75])
    xt = S.add_noise(x0, noise, t)
    torch.testing.assert_close(xt[1], 0.5 * x0[1] + 0.5 * noise[1])
    v = S.flow_target(x0, noise)
    # one exact Euler step along the true velocity lands on x0
    torch.testing.assert_close(S.euler_step(xt, v, 0.5, 0.0)[1], x0[1])


@pytest.mark.parametrize("method", ["uniform", "logit_normal", "sigmoid"])
def test_sample_timesteps(method):
    g = torch.Generator().manual_seed(0)
    t = S.sample_timesteps(4096, method, generator=g)
    assert t.shape == (4096,) and (t > 0).all() and (t < 1).all()
    g = torch.Generator().manual_seed(0)
    shifted = S.sample_timesteps(4096, method, seq_len=4096, generator=g)
    assert (shifted >= t - 1e-6).all() and shifted.mean() > t.mean()  # mu=1.15 pushes toward noise
    g = torch.Generator().manual_seed(0)
    fixed = S.sample_timesteps(4096, method, shift=3.0, generator=g)
    torch.testing.assert_close(fixed, (3 * t / (1 + 2 * t)).clamp(1e-5, 1 - 1e-5))
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        S.sample_timesteps(2, "cosine")
