"""The DiT against diffusers' FluxTransformer2DModel (independent implementation) and the published counts."""

from dataclasses import replace

import pytest
import torch

from flux_lora.model.flux import PRESETS, Flux, FluxParams, count_parameters
from flux_lora.weights.keymaps import flux_linear_maps, flux_to_diffusers, flux_to_diffusers_config
from flux_lora.weights.loading import load_flow_model

from helpers.dit import dit_inputs
from helpers.numerics import rel_err
from helpers.parity import diffusers_forward

diffusers = pytest.importorskip("diffusers")

TINY = PRESETS["tiny"]
CONFIGS = {
    "dev-like": TINY,
    "schnell-like": PRESETS["tiny-schnell"],
    # the real head size 128 and RoPE axes (16, 56, 56), at 2 heads
    "real-head": replace(TINY, hidden_size=256, num_heads=2, axes_dim=(16, 56, 56), depth=1, depth_single_blocks=1),
}


@pytest.mark.parametrize(
    ("name", "params", "tensors"),
    [
        ("flux-dev", 11_901_408_320, 780),
        ("flux-schnell", 11_891_178_560, 776),
    ],
)
def test_full_size_counts(name, params, tensors):
    with torch.device("meta"):
        model = Flux(PRESETS[name])
    assert count_parameters(model) == (params, tensors)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (314 if name == "flux-dev" else 312)
    assert sum(n.startswith(("double_blocks", "single_blocks")) for n in linears) == 304
    # the declarative diffusers map covers every Linear exactly once
    assert sorted(m.bfl for m in flux_linear_maps(PRESETS[name])) == sorted(linears)


def _random_diffusers(p: FluxParams, seed: int):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(p)).eval()
    with torch.no_grad():  # make every tensor matter: no zero biases, norm weights around 1
        for name, t in model.named_parameters():
            if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name:
                t.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                t.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers_loaded_from_sharded_folder(name, tmp_path):
    """Random diffusers weights -> sharded diffusers folder -> our loader -> same velocity."""
    p = CONFIGS[name]
    ref = _random_diffusers(p, seed=1)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="300KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1  # really sharded
    ours = load_flow_model(tmp_path, p, dtype=torch.float32)
    x = dit_inputs(p)
    with torch.no_grad():
        expected = diffusers_forward(ref, x)
        got = ours(**x)
    assert got.shape == (2, 12, p.out_channels)
    err = rel_err(got, expected, "max")
    assert err <= 1e-5, f"relative max error {err:.2e}"


def test_our_weights_run_in_diffusers():
    """The other direction: our state dict through keymaps.flux_to_diffusers loads strictly into diffusers."""
    p = TINY
    torch.manual_seed(3)
    ours = Flux(p).eval()
    ref = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(p)).eval()
    ref.load_state_dict(flux_to_diffusers(ours.state_dict(), p), strict=True)
    x = dit_inputs(p, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(**x), diffusers_forward(ref, x), rtol=1e-5, atol=1e-5)


def test_key_map_matches_diffusers_converter_at_real_width():
    """diffusers' own BFL converter (hard-coded to hidden 3072) agrees with our table, row for row.

    Each tensor is a stride-0 view whose value encodes (key, row), so 1+1 full-width blocks cost no memory."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    p = replace(PRESETS["flux-dev"], depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in Flux(p).state_dict().items()}
    sd = {}
    for i, (k, shape) in enumerate(sorted(shapes.items())):
        rows = torch.arange(shape[0], dtype=torch.float64) + 100_000 * i
        sd[k] = rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    ours = flux_to_diffusers(dict(sd), p)
    assert sorted(theirs) == sorted(ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
