"""LoRA layouts: converter properties on weight deltas, every reader, ComfyUI's key map, metadata, errors."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_lora.lora.convert import main as convert_main
from flux_lora.lora.files import (
    LoraFormatError,
    from_diffusers_state_dict,
    from_kohya_state_dict,
    from_state_dict,
    read_lora,
    to_diffusers_state_dict,
    to_kohya_state_dict,
    write_lora,
)
from flux_lora.lora.keys import detect_layout, linear_shapes
from flux_lora.lora.weight import LoraWeight
from flux_lora.model.flux import PRESETS, Flux, FluxParams
from flux_lora.weights.safetensors_io import iter_tensors, read_keys, read_metadata

from helpers.lora import random_lora

# Tiny and odd-sized on purpose: hidden 32 (q/k/v blocks of 32 rows), mlp 128, in/out channels 16.
P = FluxParams(
    in_channels=16,
    out_channels=16,
    vec_in_dim=8,
    context_in_dim=12,
    hidden_size=32,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=(4, 6, 6),
)
NAMES = sorted(linear_shapes(P))


alphas_st = st.one_of(st.integers(1, 64).map(float), st.floats(0.125, 100.0, allow_nan=False, width=32))


@st.composite
def loras(draw):
    names = sorted(draw(st.sets(st.sampled_from(NAMES), min_size=1)))
    ranks = draw(st.lists(st.integers(1, 6), min_size=len(names), max_size=len(names)))
    alphas = draw(st.lists(alphas_st, min_size=len(names), max_size=len(names)))
    return random_lora(P, names, rank=ranks, alpha=alphas, scale=1.0, seed=draw(st.integers(0, 2**31)))


def assert_close_rel(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding, relative to the tensor's scale."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def assert_delta_close(got: LoraWeight, want: LoraWeight) -> None:
    assert_close_rel(got.delta(), want.delta())


# --------------------------------------------------------------------- ComfyUI's key map, from the reference


def comfyui_key_map(p: FluxParams) -> dict[str, tuple[str, int, int, bool]]:
    """Base names ComfyUI accepts for a FLUX model (reference §4) -> (weight key, first row, rows, swap).

    Built from the model's state-dict keys (kohya ``lora_unet_`` and ``diffusion_model.`` forms) and from the
    BFL<->diffusers table of reference §1.2, written out here (``transformer.``, OneTrainer, LyCORIS, bare).
    """
    with torch.device("meta"):
        sd = Flux(p).state_dict()
    out: dict[str, tuple[str, int, int, bool]] = {}
    for key, t in sd.items():
        if key.endswith(".weight"):
            base = key.removesuffix(".weight")
            for name in ("lora_unet_" + base.replace(".", "_"), f"diffusion_model.{base}"):
                out[name] = (f"diffusion_model.{key}", 0, t.shape[0], False)
    d, mlp = p.hidden_size, p.mlp_hidden_dim
    table = {
        "x_embedder": ("img_in", 0, None),
        "context_embedder": ("txt_in", 0, None),
        "proj_out": ("final_layer.linear", 0, None),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, None),
    }
    for emb, bfl in (
        ("timestep_embedder", "time_in"),
        ("text_embedder", "vector_in"),
        ("guidance_embedder", "guidance_in"),
    ):
        for j, layer in ((1, "in_layer"), (2, "out_layer")):
            table[f"time_text_embed.{emb}.linear_{j}"] = (f"{bfl}.{layer}", 0, None)
    for i in range(p.depth):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for k, (q, ad) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            table[f"{t}.attn.{q}"] = (f"{b}.img_attn.qkv", k * d, d)
            table[f"{t}.attn.{ad}"] = (f"{b}.txt_attn.qkv", k * d, d)
        for diff, bfl in (
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
            ("attn.to_out.0", "img_attn.proj"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
        ):
            table[f"{t}.{diff}"] = (f"{b}.{bfl}", 0, None)
    for i in range(p.depth_single_blocks):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            table[f"{t}.attn.{name}"] = (f"{b}.linear1", k * d, d)
        table[f"{t}.proj_mlp"] = (f"{b}.linear1", 3 * d, mlp)
        table[f"{t}.proj_out"] = (f"{b}.linear2", 0, None)
        table[f"{t}.norm.linear"] = (f"{b}.modulation.lin", 0, None)
    for diff, (bfl, start, rows) in table.items():
        if f"{bfl}.weight" not in sd:
            continue  # guidance_in on schnell
        entry = (
            f"diffusion_model.{bfl}.weight",
            start,
            rows or sd[f"{bfl}.weight"].shape[0],
            diff == "norm_out.linear",
        )
        for name in (
            f"transformer.{diff}",
            f"lora_transformer_{diff.replace('.', '_')}",
            f"lycoris_{diff.replace('.', '_')}",
            diff,
        ):
            out[name] = entry
    return out


def comfyui_consume(file: dict[str, torch.Tensor], p: FluxParams, suffixes: tuple[str, ...]) -> dict:
    """Emulate ComfyUI's ``load_lora``: base name -> LoRA; asserts every key is used and every shape fits."""
    with torch.device("meta"):
        weights = {f"diffusion_model.{k}": t.shape for k, t in Flux(p).state_dict().items()}
    key_map = comfyui_key_map(p)
    consumed, patches = set(), {}
    for base, (wkey, start, rows, swap) in key_map.items():
        found = {s: f"{base}{s}" for s in suffixes if f"{base}{s}" in file}
        if not found:
            continue
        consumed.update(found.values())
        up, down = (file[found[s]] for s in suffixes[:2])
        alpha = float(file[found[suffixes[2]]]) if suffixes[2] in found else down.shape[0]
        assert up.shape == (rows, down.shape[0]) and down.shape[1] == weights[wkey][1], base
        patches[base] = (wkey, start, up, down, alpha, swap)
    assert consumed == set(file), f"keys ComfyUI would not load: {sorted(set(file) - consumed)[:5]}"
    return patches


def comfyui_delta(patch) -> tuple[str, int, torch.Tensor]:
    """ComfyUI's update for one patch: ``(weight key, first row, strength 1 * alpha / rank * up @ down)``."""
    wkey, start, up, down, alpha, swap = patch
    delta = (alpha / down.shape[0]) * up @ down
    return wkey, start, torch.cat(delta.chunk(2)[::-1]) if swap else delta


KOHYA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")
PEFT_SUFFIXES = (".lora_B.weight", ".lora_A.weight", ".alpha")


def test_kohya_file_of_full_flux_dev_is_consumed_by_comfyui_key_map():
    """304 block modules of real flux-dev at rank 1 (small tensors, real shapes): every key loads."""
    for name in ("flux-dev", "flux-schnell"):
        p = PRESETS[name]
        shapes = linear_shapes(p)
        blocks = [n for n in shapes if n.startswith(("double_blocks.", "single_blocks."))]
        assert len(blocks) == 304
        lora = {n: LoraWeight(torch.ones(1, shapes[n][1]), torch.ones(shapes[n][0], 1), 1.0) for n in blocks}
        sd = to_kohya_state_dict(lora, p)
        assert len(sd) == 3 * 304
        assert len(comfyui_consume(sd, p, KOHYA_SUFFIXES)) == 304


@settings(max_examples=30, deadline=None)
@given(loras())
def test_kohya_diffusers_kohya_keeps_every_delta(lora):
    kohya = to_kohya_state_dict(lora, P)
    assert detect_layout(kohya) == "kohya"
    patches = comfyui_consume(kohya, P, KOHYA_SUFFIXES)
    for name, w in lora.items():  # ComfyUI's reading of our kohya file gives our delta
        assert_close_rel(comfyui_delta(patches["lora_unet_" + name.replace(".", "_")])[2], w.delta())
    for bake in (True, False):
        diff = to_diffusers_state_dict(from_kohya_state_dict(kohya, P), P, bake)
        assert detect_layout(diff) == "diffusers"
        # each split part is exactly the rows of the fused delta that ComfyUI's table assigns to it
        fused = {f"diffusion_model.{n}.weight": w.delta() for n, w in lora.items()}
        for patch in comfyui_consume(diff, P, PEFT_SUFFIXES).values():
            wkey, start, delta = comfyui_delta(patch)
            want = fused[wkey][start : start + delta.shape[0]]
            assert_close_rel(delta, want)
        back = from_kohya_state_dict(to_kohya_state_dict(from_diffusers_state_dict(diff, P), P), P)
        assert set(back) == set(lora)
        for name, w in lora.items():
            # diffusers matches alphas by name suffix: single proj_out modules take the final proj_out's alpha
            realigned = name.endswith("linear2") and "final_layer.linear" in lora
            if bake or realigned:
                assert_delta_close(back[name], w)
            else:  # shared A, same alpha: the fused tensors come back bit for bit
                assert torch.equal(back[name].down, w.down) and torch.equal(back[name].up, w.up)
                assert back[name].alpha == w.alpha


def _diffusers_parts(parts: dict[str, LoraWeight]) -> dict[str, torch.Tensor]:
    sd = {}
    for module, w in parts.items():
        sd[f"transformer.{module}.lora_A.weight"] = w.down
        sd[f"transformer.{module}.lora_B.weight"] = w.up
        sd[f"transformer.{module}.alpha"] = torch.tensor(w.alpha, dtype=torch.float64)  # any float dtype
    return sd


SINGLE = "single_transformer_blocks.0"
LINEAR1_PARTS = {
    f"{SINGLE}.attn.to_q": (0, 32),
    f"{SINGLE}.attn.to_k": (32, 32),
    f"{SINGLE}.attn.to_v": (64, 32),
    f"{SINGLE}.proj_mlp": (96, 128),
}


@settings(max_examples=30, deadline=None)
@given(
    st.sets(st.sampled_from(sorted(LINEAR1_PARTS)), min_size=1),
    st.integers(1, 5),
    st.booleans(),
    st.booleans(),
    st.lists(st.integers(1, 5), min_size=4, max_size=4),
    st.lists(alphas_st, min_size=4, max_size=4),
    st.integers(0, 2**31),
)
def test_split_to_fused_is_exact(modules, rank, shared_a, same_alpha, ranks, alphas, seed):
    """q/k/v/mlp LoRAs -> fused linear1: rank r if A is shared, else concatenated ranks, block-diagonal B."""
    g = torch.Generator().manual_seed(seed)
    modules = sorted(modules)
    alpha = alphas[0]
    a_shared = torch.randn(rank, 32, generator=g)
    parts = {}
    for i, m in enumerate(modules):
        r = rank if shared_a else ranks[i]
        a = a_shared if shared_a else torch.randn(r, 32, generator=g)
        parts[m] = LoraWeight(a, torch.randn(LINEAR1_PARTS[m][1], r, generator=g), alpha if same_alpha else alphas[i])
    fused = from_diffusers_state_dict(_diffusers_parts(parts), P)["single_blocks.0.linear1"]
    delta = fused.delta()
    covered = torch.zeros(224, dtype=torch.bool)
    for m, w in parts.items():
        start, rows = LINEAR1_PARTS[m]
        covered[start : start + rows] = True
        assert_close_rel(delta[start : start + rows], w.delta())
    assert not delta[~covered].any()  # rows of absent parts get no update
    if shared_a:
        assert fused.rank == rank and torch.equal(fused.down, a_shared)
        if same_alpha:
            assert fused.alpha == alpha and torch.equal(
                fused.up[covered],
                torch.cat([parts[m].up for m in sorted(parts, key=lambda m: LINEAR1_PARTS[m][0])]),
            )
    else:
        assert fused.rank == sum(w.rank for w in parts.values())
    # the diffusers export of the fused LoRA gives one LoRA per original part (compact if B is block-diagonal)
    again = to_diffusers_state_dict({"single_blocks.0.linear1": fused}, P, bake_scale=False)
    got = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in again if k.endswith("lora_A.weight")}
    assert got == set(modules)
    if not shared_a:
        for m, w in parts.items():
            assert again[f"transformer.{m}.lora_A.weight"].shape[0] == w.rank


def test_split_with_equal_scales_scales_alpha_by_the_number_of_parts():
    """Three rank-4 parts with alpha 8 and different A (sd-scripts' split_qkv): rank 12, alpha 24, exact B."""
    shapes = {f"transformer_blocks.0.attn.{m}": (32, 32) for m in ("to_q", "to_k", "to_v")}
    parts = random_lora(shapes, rank=4, alpha=8.0, scale=1.0, seed=3)
    fused = from_diffusers_state_dict(_diffusers_parts(parts), P)["double_blocks.0.img_attn.qkv"]
    assert (fused.rank, fused.alpha) == (12, 24.0)
    assert torch.equal(fused.up, torch.block_diag(*(w.up for w in parts.values())))
    assert torch.equal(fused.down, torch.cat([w.down for w in parts.values()]))


def test_norm_out_swap_is_its_own_inverse():
    name = "final_layer.adaLN_modulation.1"
    w = random_lora(P, [name], rank=3, alpha=3.0, scale=1.0, seed=1)[name]
    diff = to_diffusers_state_dict({name: w}, P, bake_scale=False)
    b = diff["transformer.norm_out.linear.lora_B.weight"]
    assert torch.equal(b, torch.cat([w.up[32:], w.up[:32]]))  # BFL [shift; scale] -> diffusers [scale; shift]
    assert torch.equal(torch.cat([b[32:], b[:32]]), w.up)
    back = from_diffusers_state_dict(diff, P)[name]
    assert torch.equal(back.up, w.up) and torch.equal(back.down, w.down) and back.alpha == 3.0


def test_xlabs_layout_pads_single_qkv_into_linear1():
    g = torch.Generator().manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    for prefix in ("", "diffusion_model."):
        sd = {
            f"{prefix}double_blocks.0.processor.qkv_lora1.down.weight": rnd(4, 32),
            f"{prefix}double_blocks.0.processor.qkv_lora1.up.weight": rnd(96, 4),
            f"{prefix}double_blocks.0.processor.proj_lora2.down.weight": rnd(4, 32),
            f"{prefix}double_blocks.0.processor.proj_lora2.up.weight": rnd(32, 4),
            f"{prefix}single_blocks.0.processor.qkv_lora.down.weight": rnd(4, 32),
            f"{prefix}single_blocks.0.processor.qkv_lora.up.weight": rnd(96, 4),
        }
        assert detect_layout(sd) == "xlabs"
        lora = read_lora(sd, P)
        assert set(lora) == {
            "double_blocks.0.img_attn.qkv",
            "double_blocks.0.txt_attn.proj",
            "single_blocks.0.linear1",
        }
        lin1 = lora["single_blocks.0.linear1"]
        assert lin1.up.shape == (224, 4) and lin1.scale == 1.0  # XLabs stores no alpha: scale 1
        assert torch.equal(lin1.up[:96], sd[f"{prefix}single_blocks.0.processor.qkv_lora.up.weight"])
        assert not lin1.up[96:].any()  # the mlp rows are zero padding
        assert lora["double_blocks.0.img_attn.qkv"].scale == 1.0


# --------------------------------------------------------------------- other readers


def _pair(g, rows, cols, rank):
    return torch.randn(rank, cols, generator=g), torch.randn(rows, rank, generator=g)


def test_comfyui_native_and_peft_raw_layouts():
    g = torch.Generator().manual_seed(4)
    down, up = _pair(g, 32, 32, 2)
    cases = {  # keys -> expected alpha of double_blocks.0.img_attn.proj
        "comfyui": (
            {
                "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": down,
                "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": up,
            },
            2.0,
        ),  # no alpha: scale 1
        "comfyui-A/B": (
            {
                "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": down,
                "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": up,
                "diffusion_model.double_blocks.0.img_attn.proj.alpha": torch.tensor(5),
            },
            5.0,
        ),  # int alpha
        "peft": (
            {
                "base_model.model.double_blocks.0.img_attn.proj.lora_A.weight": down,
                "base_model.model.double_blocks.0.img_attn.proj.lora_B.weight": up,
            },
            2.0,
        ),
        "peft-bare": (
            {
                "double_blocks.0.img_attn.proj.lora_A.weight": down,
                "double_blocks.0.img_attn.proj.lora_B.weight": up,
            },
            2.0,
        ),
        "onetrainer": (
            {
                "lora_transformer_transformer_blocks_0_attn_to_out_0.lora_down.weight": down,
                "lora_transformer_transformer_blocks_0_attn_to_out_0.lora_up.weight": up,
                "lora_transformer_transformer_blocks_0_attn_to_out_0.alpha": torch.tensor([3.0]),
            },
            3.0,
        ),
        "lycoris": (
            {
                "lycoris_transformer_blocks_0_attn_to_out_0.lora_down.weight": down,
                "lycoris_transformer_blocks_0_attn_to_out_0.lora_up.weight": up,
                "lycoris_transformer_blocks_0_attn_to_out_0.alpha": torch.tensor(1.5, dtype=torch.bfloat16),
            },
            1.5,
        ),
        "diffsynth": (
            {
                "transformer_blocks.0.attn.to_out.0.lora_A.weight": down,
                "transformer_blocks.0.attn.to_out.0.lora_B.weight": up,
            },
            2.0,
        ),
    }
    for layout, (sd, alpha) in cases.items():
        assert detect_layout(sd) == layout.split("-")[0]
        w = read_lora(sd, P)["double_blocks.0.img_attn.proj"]
        assert torch.equal(w.down, down) and torch.equal(w.up, up) and w.alpha == alpha, layout


def test_alpha_from_lora_adapter_metadata():
    """diffusers/peft files without .alpha keys take alpha from the peft LoraConfig in the header."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for module, rows in (
        ("transformer_blocks.0.attn.to_out.0", 32),
        ("transformer_blocks.0.ff.net.2", 32),
        ("single_transformer_blocks.0.proj_out", 32),
    ):
        down, up = _pair(g, rows, 128 if "net.2" in module else (160 if "proj_out" in module else 32), 4)
        sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"] = down, up
    cfg = {
        "transformer.r": 4,
        "transformer.lora_alpha": 8,
        "transformer.alpha_pattern": {"ff.net.2": 2},
        "transformer.use_rslora": False,
    }
    lora = read_lora(sd, P, metadata={"lora_adapter_metadata": json.dumps(cfg)})
    assert lora["double_blocks.0.img_attn.proj"].alpha == 8.0
    assert lora["double_blocks.0.img_mlp.2"].alpha == 2.0
    assert lora["single_blocks.0.linear2"].alpha == 8.0
    rs = read_lora(sd, P, metadata={"lora_adapter_metadata": json.dumps({**cfg, "transformer.use_rslora": True})})
    assert rs["double_blocks.0.img_attn.proj"].scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    assert read_lora(sd, P)["double_blocks.0.img_attn.proj"].alpha == 4.0  # nothing: scale 1
    # raw peft keys (BFL names) with an unprefixed LoraConfig passed by the caller as a dict
    raw = {
        k.replace("transformer.transformer_blocks.0.attn.to_out.0", "base_model.model.double_blocks.0.img_attn.proj"): v
        for k, v in sd.items()
        if "to_out" in k
    }
    peft = read_lora(raw, P, metadata={"lora_adapter_metadata": {"lora_alpha": 16, "alpha_pattern": {"ff": 1}}})
    assert detect_layout(raw) == "peft" and peft["double_blocks.0.img_attn.proj"].alpha == 16.0


def _kohya_proj(down: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    base = "lora_unet_double_blocks_0_img_attn_proj"
    return {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}


def test_unmatched_keys_give_one_warning_when_partial_is_allowed(caplog):
    g = torch.Generator().manual_seed(6)
    down, up = _pair(g, 32, 32, 2)
    sd = {
        **_kohya_proj(down, up),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
        "lora_unet_double_blocks_7_img_attn_proj.alpha": torch.tensor(1.0),
        "double_blocks.0.img_attn.proj.lora_mid.weight": torch.zeros(2, 2),  # LoCon's conv-only middle
    }
    with pytest.raises(LoraFormatError, match="3 keys cannot be applied"):
        read_lora(sd, P)  # the default: a partial LoRA is a different model
    with caplog.at_level(logging.WARNING, logger="flux_lora"):
        lora = read_lora(sd, P, allow_partial=True)
    assert set(lora) == {"double_blocks.0.img_attn.proj"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    ignored = [k for k in sd if not k.startswith("lora_unet_double_blocks_0_")]  # TE key, stray alpha, lora_mid
    assert len(ignored) == 3 and all(key in message for key in ignored)
    assert "lora_unet_double_blocks_0_img_attn_proj" not in message


# --------------------------------------------------------------------- files, metadata, errors


def test_kohya_file_round_trips_bit_exactly(tmp_path):
    ranks, alphas = [1 + i % 5 for i in range(len(NAMES))], [float(1 + i) for i in range(len(NAMES))]
    lora = random_lora(P, NAMES, rank=ranks, alpha=alphas, scale=1.0, seed=7, dtype=torch.bfloat16)
    path = write_lora(tmp_path / "style.safetensors", lora, P)
    back = read_lora(path, P)
    assert set(back) == set(lora)
    for name, w in lora.items():
        assert back[name].down.dtype == torch.bfloat16
        assert torch.equal(back[name].down, w.down) and torch.equal(back[name].up, w.up) and back[name].alpha == w.alpha
    alpha = dict(iter_tensors(path))["lora_unet_img_in.alpha"]
    assert alpha.dtype == torch.float32 and alpha.ndim == 0


def test_kohya_metadata(tmp_path):
    lora = random_lora(
        P, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"], rank=4, alpha=8.0, scale=1.0, seed=8
    )
    path = write_lora(tmp_path / "mine.safetensors", lora, P, metadata={"ss_steps": "100", "modelspec.author": "me"})
    meta = read_metadata(path)
    assert meta["format"] == "pt" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "8.0" and json.loads(meta["ss_network_args"]) == {}
    assert meta["ss_output_name"] == "mine" and meta["ss_steps"] == "100" and meta["modelspec.author"] == "me"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["modelspec.title"] == "mine" and meta["modelspec.resolution"] == "1024x1024" and meta["modelspec.date"]
    assert "lora_adapter_metadata" not in meta
    data = path.read_bytes()  # kohya's sshs_model_hash: sha256 of everything after the safetensors header
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    schnell = write_lora(tmp_path / "s.safetensors", lora, replace(P, guidance_embed=False))
    assert read_metadata(schnell)["modelspec.architecture"] == "flux-1-schnell/lora"
    with pytest.raises(TypeError, match="ss_steps"):
        write_lora(tmp_path / "bad.safetensors", lora, P, metadata={"ss_steps": 100})
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        write_lora(tmp_path / "bad.safetensors", lora, P, metadata={"lora_adapter_metadata": "{}"})
    assert not (tmp_path / "bad.safetensors").exists()


def test_kohya_writer_warns_about_modules_diffusers_drops(tmp_path, caplog):
    lora = random_lora(P, ["img_in", "final_layer.linear", "double_blocks.0.img_mlp.0"], alpha=1.0, scale=1.0, seed=9)
    with caplog.at_level(logging.WARNING, logger="flux_lora"):
        write_lora(tmp_path / "x.safetensors", lora, P)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "diffusers" in msg and "img_in" in msg and "final_layer.linear" in msg and "img_mlp" not in msg


def test_bad_input_errors_name_the_file_and_keys(tmp_path):
    from safetensors.torch import save_file

    nothing = tmp_path / "nothing.safetensors"
    save_file({"foo.bar.weight": torch.zeros(2, 2), "text_model.x.lora_A.weight": torch.zeros(1, 2)}, nothing)
    with pytest.raises(LoraFormatError, match=r"nothing\.safetensors.*foo\.bar\.weight"):
        read_lora(nothing, P)
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4),
        },
        wrong,
    )
    with pytest.raises(LoraFormatError, match=r"wrong\.safetensors.*lora_unet_double_blocks_0_img_attn_qkv"):
        read_lora(wrong, P)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        read_lora(garbage, P)
    pickled = tmp_path / "old.ckpt"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(LoraFormatError, match=r"old\.ckpt.*safetensors"):
        read_lora(pickled, P)
    g = torch.Generator().manual_seed(10)
    down, up = _pair(g, 32, 32, 2)
    twice = {
        **_kohya_proj(down, up),
        "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": down,
        "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": up,
    }
    with pytest.raises(LoraFormatError, match="lora_unet_double_blocks_0_img_attn_proj"):
        from_state_dict(twice, P)
    with pytest.raises(LoraFormatError, match="not a Linear"):
        to_kohya_state_dict({"double_blocks.5.img_attn.proj": LoraWeight(down, up, 1.0)}, P)
    with pytest.raises(LoraFormatError, match="expected a kohya"):
        from_kohya_state_dict({k: v for k, v in twice.items() if k.startswith("diffusion")}, P)


def test_convert_cli_both_ways(tmp_path, tiny_dev_dir, caplog):
    tiny = PRESETS["tiny"]
    lora = random_lora(tiny, sorted(linear_shapes(tiny)), rank=3, alpha=5.0, scale=1.0, seed=11)
    kohya = write_lora(tmp_path / "in.safetensors", lora, tiny)
    d, k = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    with caplog.at_level(logging.INFO):
        assert convert_main([str(kohya), str(d), "--to", "diffusers", "--model", "tiny"]) == 0
        assert convert_main([str(d), str(k), "--to", "kohya", "--model", str(tiny_dev_dir)]) == 0  # model folder
    assert detect_layout(read_keys(d)) == "diffusers" and detect_layout(read_keys(k)) == "kohya"
    back = read_lora(k, tiny)
    for name, w in lora.items():
        assert_delta_close(back[name], w)
    caplog.clear()
    assert convert_main([str(kohya), str(tmp_path / "x.safetensors"), "--to", "kohya", "--model", "flux-dev"]) == 1
    assert "in.safetensors" in caplog.text and "lora_unet_" in caplog.text  # shapes do not fit flux-dev
    caplog.clear()
    no_bake = [str(kohya), str(tmp_path / "s.safetensors"), "--to", "diffusers", "--model", "tiny", "--no-bake"]
    with caplog.at_level(logging.INFO):
        assert convert_main(no_bake) == 0
    assert "wrote" in caplog.text and read_lora(tmp_path / "s.safetensors", tiny).keys() == lora.keys()
    assert any(k.endswith(".alpha") for k in read_keys(tmp_path / "s.safetensors"))  # --no-bake: alpha keys
    caplog.clear()
    missing = [str(tmp_path / "missing.safetensors"), str(tmp_path / "y.safetensors"), "--to", "kohya"]
    assert convert_main(missing) == 1 and "missing.safetensors" in caplog.text


@pytest.mark.parametrize(
    ("argv0", "usage"),
    [
        ("/venv/bin/flux-lora-convert", "usage: flux-lora-convert "),
        ("/src/flux_lora/lora/convert.py", "usage: python -m flux_lora.lora.convert "),
    ],
)
def test_convert_help_names_the_command_that_ran(argv0, usage, monkeypatch, capsys):
    from flux_lora.lora import convert

    monkeypatch.setattr("sys.argv", [argv0, "--help"])
    with pytest.raises(SystemExit):
        convert.main(["--help"])
    assert capsys.readouterr().out.startswith(usage)
