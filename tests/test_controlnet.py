"""The ControlNet against diffusers' FluxControlNetModel / FluxMultiControlNetModel, and the DiT's use of its
residuals against diffusers' FluxTransformer2DModel (independent implementations), in float32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flux_lora.model.controlnet import ControlNetParams, FluxControlNet, combine_residuals
from flux_lora.model.flux import PRESETS, ControlResiduals
from flux_lora.weights.controlnet_loading import (
    controlnet_config,
    controlnet_params_from_config,
    controlnet_to_diffusers,
    load_controlnet,
)
from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config
from flux_lora.weights.tiny import random_flux, tiny_controlnet_params, write_tiny_controlnet

from helpers.dit import controlnet_inputs
from helpers.parity import diffusers_kwargs

diffusers = pytest.importorskip("diffusers")

TINY = PRESETS["tiny"]
CONFIGS = {
    "plain": tiny_controlnet_params(),
    "union": tiny_controlnet_params(union=True),
    "no-guidance": tiny_controlnet_params(PRESETS["tiny-schnell"]),
    "doubles-only": ControlNetParams(replace(TINY, depth=2, depth_single_blocks=0)),  # as jasperai, alimama
    # FLUX's head size and RoPE axes
    "real-head": ControlNetParams(replace(TINY, hidden_size=256, num_heads=2, axes_dim=(16, 56, 56)), num_modes=10),
}


def diffusers_residuals(
    ref, x: dict, mode: torch.Tensor | None = None, scale: float = 1.0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    double, single = ref(
        controlnet_cond=x["control"], controlnet_mode=mode, conditioning_scale=scale, **diffusers_kwargs(x)
    )
    return list(double or []), list(single or [])


def assert_residuals_equal(ours: ControlResiduals, double: list, single: list) -> None:
    assert len(ours.double) == len(double) and len(ours.single) == len(single)
    for a, b in zip(ours.double + ours.single, double + single, strict=True):
        assert b.abs().max() > 0.05  # the tiny writer's output layers are random: residuals are not zero
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_residuals_match_diffusers(name, tmp_path):
    """Our writer -> diffusers' from_pretrained and our loader -> the same residuals, scale included."""
    p = CONFIGS[name]
    folder = write_tiny_controlnet(tmp_path / name, union=p.is_union, seed=3, params=p)
    ref = diffusers.FluxControlNetModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ours = load_controlnet(folder, dtype=torch.float32)
    x = controlnet_inputs(p)
    mode = torch.tensor([2, 6]) if p.is_union else None
    double, single = diffusers_residuals(ref, x, None if mode is None else mode[:, None], scale=0.7)
    assert_residuals_equal(ours(**x, mode=mode, scale=0.7), double, single)


@torch.no_grad()
def test_union_modes_are_per_sample_and_matter(tiny_union_controlnet_dir):
    cn = load_controlnet(tiny_union_controlnet_dir, dtype=torch.float32)
    x = controlnet_inputs(cn.params)
    mixed = cn(**x, mode=torch.tensor([0, 2]))
    canny, depth = cn(**x, mode="canny"), cn(**x, mode=2)
    torch.testing.assert_close(mixed.double[0][0], canny.double[0][0])
    torch.testing.assert_close(mixed.double[0][1], depth.double[0][1])
    assert (canny.double[0] - depth.double[0]).abs().max() > 1e-3


@torch.no_grad()
def test_loads_diffusers_written_shards(tiny_union_controlnet_dir, tmp_path):
    """diffusers' own sharded writer (index + shards) -> our loader -> the same model."""
    ref = diffusers.FluxControlNetModel.from_pretrained(tiny_union_controlnet_dir, torch_dtype=torch.float32)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_controlnet(tmp_path, dtype=torch.float32)
    x = controlnet_inputs(ours.params)
    mode = torch.tensor([1, 1])
    assert_residuals_equal(ours(**x, mode=mode), *diffusers_residuals(ref.eval(), x, mode[:, None]))


@pytest.mark.parametrize(
    ("name", "cfg", "params", "tensors"),
    [
        (
            "InstantX/FLUX.1-dev-Controlnet-Union-alpha",
            dict(num_layers=5, num_single_layers=10, num_mode=10),
            3_301_956_608,
            249,
        ),
        ("jasperai/Flux.1-dev-Controlnet-Depth", dict(num_layers=5, num_single_layers=0), 1_791_605_248, 148),
    ],
)
def test_full_size_key_layout_matches_diffusers(name, cfg, params, tensors):
    """At full size, on the meta device: every tensor maps to diffusers' name and shape. (jasperai's 1.79 B
    parameters are its 3.58 GB bf16 file.)"""
    full = dict(guidance_embeds=True, **cfg)
    p = controlnet_params_from_config(full)
    with torch.device("meta"):
        ours = FluxControlNet(p).state_dict()
        theirs = diffusers.FluxControlNetModel(**full).state_dict()
    assert sum(t.numel() for t in ours.values()) == params and len(ours) == tensors
    mapped = controlnet_to_diffusers(ours, p)
    assert {k: tuple(t.shape) for k, t in mapped.items()} == {k: tuple(t.shape) for k, t in theirs.items()}


def test_config_is_diffusers_kwargs():
    """Our config.json content builds diffusers' model with the same architecture."""
    p = CONFIGS["union"]
    ref = diffusers.FluxControlNetModel(**{k: v for k, v in controlnet_config(p).items() if k[0] != "_"})
    assert ref.config.num_mode == p.num_modes and len(ref.transformer_blocks) == p.trunk.depth


def test_fresh_controlnet_outputs_zero():
    """Zero output layers by design: a new ControlNet's residuals are exactly zero."""
    p = tiny_controlnet_params(union=True)
    residuals = FluxControlNet(p)(**controlnet_inputs(p), mode="tile")
    assert all(torch.count_nonzero(r) == 0 for r in residuals.double + residuals.single)


# ------------------------------------------------------------------------------------------ DiT + residuals


@pytest.fixture(scope="module")
def dit_pair():
    """A random tiny DiT with 3 + 5 blocks (so ceil and floor intervals differ), and diffusers'
    FluxTransformer2DModel holding the same weights."""
    p = replace(TINY, depth=3, depth_single_blocks=5)
    model = random_flux(p, seed=5).eval()
    ref = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(p)).eval()
    ref.load_state_dict(flux_to_diffusers(model.state_dict(), p))
    return model, ref


@pytest.mark.parametrize(("n_double", "n_single"), [(2, 3), (1, 2), (3, 5), (4, 1), (0, 2), (2, 0)])
@torch.no_grad()
def test_flux_adds_residuals_like_diffusers(n_double, n_single, dit_pair):
    """``Flux.forward(controls=...)`` == diffusers with ``controlnet_(single_)block_samples``, for residual
    counts below, equal to and above the DiT's block counts (diffusers' interval rule)."""
    model, ref = dit_pair
    x = controlnet_inputs(tiny_controlnet_params())
    g = torch.Generator().manual_seed(1)
    shape = (*x["img"].shape[:2], model.params.hidden_size)
    double = [torch.randn(shape, generator=g) for _ in range(n_double)]
    single = [torch.randn(shape, generator=g) for _ in range(n_single)]
    args = (x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])
    ours = model(*args, controls=ControlResiduals(double, single))
    theirs = ref(
        controlnet_block_samples=double or None, controlnet_single_block_samples=single or None, **diffusers_kwargs(x)
    )[0]
    assert (ours - model(*args)).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- several ControlNets


def _multi(refs: list, x: dict, controls: list, modes: list, scales: list) -> tuple[list, list]:
    return diffusers.FluxMultiControlNetModel(refs)(
        controlnet_cond=controls, controlnet_mode=modes, conditioning_scale=scales, **diffusers_kwargs(x)
    )


@torch.no_grad()
def test_two_controlnets_and_two_union_modes_match_diffusers_multi(tmp_path):
    """Summed residuals == diffusers' FluxMultiControlNetModel: two ControlNets, and one union model given two
    (image, mode) pairs, each pair with its own scale."""
    x, x2 = controlnet_inputs(tiny_controlnet_params()), controlnet_inputs(tiny_controlnet_params(), seed=9)
    folders = [write_tiny_controlnet(tmp_path / f"cn{s}", seed=s) for s in (1, 2)]
    refs = [diffusers.FluxControlNetModel.from_pretrained(f, torch_dtype=torch.float32).eval() for f in folders]
    ours = [load_controlnet(f, dtype=torch.float32) for f in folders]
    no_mode = torch.tensor([-1, -1])  # what diffusers' pipeline passes for non-union ControlNets
    double, single = _multi(refs, x, [x["control"], x2["control"]], [no_mode, no_mode], [0.6, 1.3])
    mine = [ours[0](**x, scale=0.6), ours[1](**{**x, "control": x2["control"]}, scale=1.3)]
    assert_residuals_equal(combine_residuals(mine, TINY), double, single)

    folder = write_tiny_controlnet(tmp_path / "union", union=True, seed=4)
    ref = diffusers.FluxControlNetModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    union = load_controlnet(folder, dtype=torch.float32)
    modes = [torch.tensor([0, 0]), torch.tensor([2, 2])]
    double, single = _multi([ref], x, [x["control"], x2["control"]], modes, [0.5, 0.8])
    mine = [union(**x, mode="canny", scale=0.5), union(**{**x, "control": x2["control"]}, mode="depth", scale=0.8)]
    assert_residuals_equal(combine_residuals(mine, TINY), double, single)


def test_controlnets_of_different_depths_each_keep_their_interval_rule():
    """1 double + 2 single residuals (A) with 2 double + 1 single (B), on a 2 + 2 block DiT: every DiT block
    gets A's and B's own residual (diffusers would truncate both lists to the shorter one)."""
    g = torch.Generator().manual_seed(0)

    def t() -> torch.Tensor:
        return torch.randn(1, 3, TINY.hidden_size, generator=g)

    a = ControlResiduals(double=[t()], single=[t(), t()])
    b = ControlResiduals(double=[t(), t()], single=[t()])
    both = combine_residuals([a, b], TINY)
    zero = torch.zeros(1, 3, TINY.hidden_size)
    for i in range(TINY.depth):
        torch.testing.assert_close(both.add_double(i, TINY.depth, zero), a.double[0] + b.double[i])
    for i in range(TINY.depth_single_blocks):
        expected = a.single[i] + b.single[0]
        torch.testing.assert_close(both.add_single(i, TINY.depth_single_blocks, zero), expected)
    mixed = combine_residuals([ControlResiduals(double=[t()], single=[]), b], TINY)
    assert mixed.single == b.single  # diffusers drops every single residual when one ControlNet has none
