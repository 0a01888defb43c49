"""LoRA kinds beyond plain LoRA (DoRA, LoHa, LoKr, .diff/.diff_b, lora_B.bias), each against its closed form
written out here, unfused and fused, on bf16 and fp8 bases, and removed again bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flux_lora.lora.files import LoraFormatError, read_lora, write_lora
from flux_lora.lora.patches import Patch, dense_change
from flux_lora.lora.runtime import apply_loras, remove_loras, set_lora_scale
from flux_lora.model.flux import PRESETS
from flux_lora.model.fp8 import FP8Linear, quantize_
from flux_lora.weights.tiny import random_flux

P = PRESETS["tiny"]
L2 = "single_blocks.0.linear2"  # [64, 320]
K2 = "lora_unet_single_blocks_0_linear2"
L2D = "single_transformer_blocks.0.proj_out"  # L2 as diffusers names it
OUT, IN = 64, 320


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(*shape: int, g: torch.Generator, std: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def case(kind: str) -> tuple[dict[str, torch.Tensor], callable]:
    """A file's tensors for ``L2`` and the closed form ``W -> (D, db)`` of its change at strength 1."""
    g = _g(1)
    if kind == "loha":
        w1a, w1b, w2a, w2b = _r(OUT, 4, g=g), _r(4, IN, g=g), _r(OUT, 4, g=g), _r(4, IN, g=g)
        sd = {f"{K2}.hada_w1_a": w1a, f"{K2}.hada_w1_b": w1b, f"{K2}.hada_w2_a": w2a, f"{K2}.hada_w2_b": w2b}
        sd[f"{K2}.alpha"] = torch.tensor(2.0)
        return sd, lambda w: ((2.0 / 4) * (w1a @ w1b) * (w2a @ w2b), None)
    if kind == "lokr":
        w1, w2a, w2b = _r(8, 16, g=g), _r(8, 3, g=g), _r(3, 20, g=g)
        sd = {f"{K2}.lokr_w1": w1, f"{K2}.lokr_w2_a": w2a, f"{K2}.lokr_w2_b": w2b, f"{K2}.alpha": torch.tensor(6.0)}
        return sd, lambda w: ((6.0 / 3) * torch.kron(w1, w2a @ w2b), None)
    if kind == "diff":
        d, db = _r(OUT, IN, g=g, std=0.05), _r(OUT, g=g)
        return {f"diffusion_model.{L2}.diff": d, f"diffusion_model.{L2}.diff_b": db}, lambda w: (d, db)
    down, up = _r(4, IN, g=g), _r(OUT, 4, g=g)
    if kind == "lora_bias":  # BFL control LoRA style: bare names, lora_B has a bias, no alpha (scale 1)
        b = _r(OUT, g=g)
        sd = {f"{L2}.lora_A.weight": down, f"{L2}.lora_B.weight": up, f"{L2}.lora_B.bias": b}
        return sd, lambda w: (up @ down, b)
    if kind == "peft_lora_bias":  # peft with lora_bias=True, alpha 6 != rank 4: peft adds bias * alpha / r
        b = _r(OUT, g=g)
        sd = {f"transformer.{L2D}.lora_A.weight": down, f"transformer.{L2D}.lora_B.weight": up}
        sd |= {f"transformer.{L2D}.lora_B.bias": b, f"transformer.{L2D}.alpha": torch.tensor(6.0)}
        return sd, lambda w: (1.5 * up @ down, 1.5 * b)
    sd = {f"{K2}.lora_down.weight": down, f"{K2}.lora_up.weight": up, f"{K2}.alpha": torch.tensor(8.0)}
    if kind == "dora_rows":  # peft / LyCORIS wd_on_out: one magnitude per output row
        m = torch.rand(OUT, 1, generator=g) + 0.5
        sd[f"{K2}.dora_scale"] = m

        def dora_rows(w):
            v = w + 2.0 * up @ down
            return m * v / (v.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps) - w, None

        return sd, dora_rows
    m = torch.rand(1, IN, generator=g) + 0.5  # LyCORIS' default: one magnitude per input column
    sd[f"{K2}.dora_scale"] = m

    def dora_columns(w):
        v = w + 2.0 * up @ down
        return m * v / (v.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps) - w, None

    return sd, dora_columns


KINDS = ["loha", "lokr", "diff", "lora_bias", "peft_lora_bias", "dora_rows", "dora_columns"]


def _model(base: str):
    model = random_flux(P, 0)
    if base == "fp8":
        quantize_(model, lambda n, m: n.startswith(("double_blocks", "single_blocks")))
    else:
        model = model.to(torch.bfloat16)
    return model


def _weight(layer) -> torch.Tensor:
    return layer.dequantized_weight(torch.float32) if isinstance(layer, FP8Linear) else layer.weight.float()


def _bytes(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_bytes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(
            a[k].view(torch.uint8) if a[k].dtype.itemsize == 1 else a[k],
            b[k].view(torch.uint8) if b[k].dtype.itemsize == 1 else b[k],
        )
        for k in a
    )


@pytest.mark.parametrize("kind", KINDS)
def test_reader_returns_patches_of_the_right_kind(kind):
    sd, _ = case(kind)
    change = read_lora(sd, P)[L2]
    assert isinstance(change, tuple) and len(change) == 1 and isinstance(change[0], Patch)
    expected = {"loha": ["LoHa"], "lokr": ["LoKr"], "diff": ["diff", "bias"], "lora_bias": ["LoRA", "bias"]}
    expected["peft_lora_bias"] = ["LoRA", "bias"]
    assert change[0].kinds == expected.get(kind, ["LoRA", "DoRA"])


@pytest.mark.parametrize("base", ["bf16", "fp8"])
@pytest.mark.parametrize("kind", KINDS)
def test_unfused_matches_the_closed_form_and_comes_off_exactly(kind, base):
    sd, closed = case(kind)
    model = _model(base)
    layer = model.get_submodule(L2)
    before, w = _bytes(model), _weight(layer)
    d, db = closed(w)
    x = torch.randn(3, IN, generator=_g(2)).to(torch.bfloat16)
    plain = layer(x).float()
    apply_loras(model, [(read_lora(sd, P), 0.7, "kind")])
    effect = layer(x).float() - plain
    expected = F.linear(x.float(), 0.7 * d, None if db is None else 0.7 * db)
    torch.testing.assert_close(effect, expected, rtol=0.03, atol=0.03 * expected.abs().max().item())
    set_lora_scale(model, "kind", 0.0)
    assert torch.equal(layer(x).float(), plain)
    remove_loras(model)
    assert _same_bytes(_bytes(model), before) and not hasattr(layer, "runtime_loras")
    assert torch.equal(layer(x).float(), plain)


@pytest.mark.parametrize("base", ["bf16", "fp8"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_matches_the_closed_form_and_unfuses_bit_exactly(kind, base):
    sd, closed = case(kind)
    model = _model(base)
    layer = model.get_submodule(L2)
    before, w, b = _bytes(model), _weight(layer), layer.bias.float().clone()
    d, db = closed(w)
    apply_loras(model, [(read_lora(sd, P), 0.7, "kind")], mode="fused")
    target = w + 0.7 * d
    got = _weight(layer)
    if base == "fp8":  # re-quantized: within e4m3's rounding of each row, and the change is really there
        step = target.abs().amax(dim=1, keepdim=True) / 8
        assert ((got - target).abs() <= step).all()
        assert (got - target).norm() < 0.25 * (0.7 * d).norm()
    else:
        torch.testing.assert_close(got, target.to(torch.bfloat16).float(), rtol=0.01, atol=1e-3)
    expected_b = b if db is None else b + 0.7 * db
    torch.testing.assert_close(layer.bias.float(), expected_b.to(layer.bias.dtype).float(), rtol=0.01, atol=1e-3)
    remove_loras(model)
    assert _same_bytes(_bytes(model), before)


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_dora_norm_peft_by_default_comfyui_as_an_option(axis):
    """``[out, 1]`` magnitudes divide by the row norm of ``W + dW`` (peft, LyCORIS) by default and by the row
    norm of ``W`` with ``dora_norm="comfyui"`` (ComfyUI's weight_decompose); ``[1, in]`` ones by the column norm
    of ``W + dW`` either way."""
    sd, _ = case(f"dora_{axis}")
    w = _weight(_model("bf16").get_submodule(L2))
    m, eps = sd[f"{K2}.dora_scale"], torch.finfo(torch.float32).eps
    v = w + 2.0 * sd[f"{K2}.lora_up.weight"] @ sd[f"{K2}.lora_down.weight"]
    dim = 1 if axis == "rows" else 0
    norms = {"peft": v.norm(dim=dim, keepdim=True), "comfyui": (w if axis == "rows" else v).norm(dim=dim, keepdim=True)}
    got = {}
    for name, norm in norms.items():
        got[name], _ = dense_change(read_lora(sd, P, dora_norm=name)[L2], w)
        torch.testing.assert_close(got[name], m * v / (norm + eps) - w, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["peft"], dense_change(read_lora(sd, P)[L2], w)[0])  # the default
    assert torch.equal(got["peft"], got["comfyui"]) == (axis == "columns")
    with pytest.raises(ValueError, match="dora_norm must be one of"):
        read_lora(sd, P, dora_norm="lycoris")


def test_split_lycoris_loha_lands_on_its_rows():
    """SimpleTuner's LyCORIS names are diffusers modules: to_k of a single block is rows 64..128 of linear1."""
    g = _g(3)
    w1a, w1b, w2a, w2b = _r(64, 2, g=g), _r(2, 64, g=g), _r(64, 2, g=g), _r(2, 64, g=g)
    base = "lycoris_single_transformer_blocks_1_attn_to_k"
    sd = {f"{base}.hada_w1_a": w1a, f"{base}.hada_w1_b": w1b, f"{base}.hada_w2_a": w2a, f"{base}.hada_w2_b": w2b}
    model = random_flux(P, 0)
    layer = model.single_blocks[1].linear1
    w = layer.weight.detach().clone()
    apply_loras(model, [(read_lora(sd, P), 1.0, "k")], mode="fused")
    expected = w.clone()
    expected[64:128] += (w1a @ w1b) * (w2a @ w2b)  # no alpha: scale 1
    torch.testing.assert_close(layer.weight, expected, rtol=1e-5, atol=1e-6)


def test_patches_are_written_only_where_the_layout_holds_them(tmp_path):
    """A LoHa of a whole Linear goes back to the kohya layout as the same LyCORIS keys; the diffusers layout
    refuses it, and a full .diff patch has no kohya key this writer makes."""
    from safetensors.torch import load_file

    sd, _ = case("loha")
    path = write_lora(tmp_path / "x.safetensors", read_lora(sd, P), P)
    back = load_file(path)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(LoraFormatError, match="LoHa"):
        write_lora(tmp_path / "y.safetensors", read_lora(sd, P), P, layout="diffusers")
    with pytest.raises(LoraFormatError, match="diff"):
        write_lora(tmp_path / "z.safetensors", read_lora(case("diff")[0], P), P)


def test_incomplete_or_misshapen_patches_are_errors():
    sd, _ = case("loha")
    del sd[f"{K2}.hada_w2_b"]
    with pytest.raises(LoraFormatError, match="LoHa needs"):
        read_lora(sd, P)
    sd, _ = case("lokr")
    sd[f"{K2}.lokr_w1"] = torch.ones(8, 17)
    with pytest.raises(LoraFormatError, match=r"weight change is \(64, 340\)"):
        read_lora(sd, P)


def test_generate_dora_norm_flag_reaches_the_reader(tmp_path):
    from safetensors.torch import save_file

    from flux_lora.cli.generate import parse_args, read_loras

    sd, _ = case("dora_rows")
    path = tmp_path / "dora.safetensors"
    save_file(sd, str(path))
    args = parse_args(["--model", "m", "--prompt", "p", "--lora", str(path), "--dora-norm", "comfyui"])
    assert parse_args(["--model", "m", "--prompt", "p"]).dora_norm == "peft"
    (lora, _, _), *_ = read_loras(args.lora, tmp_path, P, False, args.dora_norm)[0]
    assert lora[L2][0].dora_norm == "comfyui"
