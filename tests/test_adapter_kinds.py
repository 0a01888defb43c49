"""lora.kind lokr / loha / dora through peft: saved in the kohya / LyCORIS layout, read back by our reader to the same
layer outputs as peft's modules (float32 and fp8 bases), loaded back into peft exactly, converted where the layout
allows; block targeting and per-module ranks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from flux_lora.config import LoraConfig, block_indices
from flux_lora.lora.convert import main as convert
from flux_lora.lora.files import LoraFormatError, read_lora, write_lora
from flux_lora.lora.peft_adapters import (
    ADAPTER,
    adapter_layers,
    adapter_state_dict,
    check_targets,
    inject_lora,
    load_adapter_weights,
)
from flux_lora.lora.runtime import apply_loras
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.fp8 import FP8Linear, quantize_
from flux_lora.weights.tiny import random_flux

from helpers.dit import dit_inputs

P = PRESETS["tiny"]
TARGETS = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_mlp.2",
    "single_blocks.0.linear1",
    "single_blocks.1.linear2",
]
KINDS = {
    "lora": {"kind": "lora"},
    "dora": {"kind": "dora"},
    "loha": {"kind": "loha"},
    "lokr": {"kind": "lokr"},  # w1 full, w2 decomposed (rank 4)
    "lokr_both": {"kind": "lokr", "decompose_both": True},  # both decomposed
    "lokr_full": {"kind": "lokr", "rank": 16},  # rank >= half the factor: both full, scale baked into w1
}


def _cfg(name: str, **over) -> LoraConfig:
    args = {"rank": 4, "alpha": 3.0, "targets": TARGETS, **KINDS[name], **over}
    return LoraConfig(**args)


def _base(fp8: bool) -> Flux:
    model = random_flux(P, seed=0).eval()
    return quantize_(model) if fp8 else model


@torch.no_grad()
def _randomize(model: Flux, seed: int = 1) -> None:
    """Every adapter tensor random (zero-initialised factors too), DoRA magnitudes away from the weight norms."""
    g = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        for attr in layer.adapter_layer_names:
            holder = getattr(layer, attr, None)
            if holder is None or ADAPTER not in holder:
                continue
            p = holder[ADAPTER].weight if isinstance(holder[ADAPTER], torch.nn.Module) else holder[ADAPTER]
            if attr == "lora_magnitude_vector":
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _out(model: Flux) -> torch.Tensor:
    with torch.no_grad():
        return model(**dit_inputs(model.params, batch=1))


def _trained(name: str, fp8: bool, **over) -> tuple[Flux, LoraConfig]:
    model = _base(fp8)
    cfg = _cfg(name, **over)
    inject_lora(model, cfg)
    _randomize(model)
    return model, cfg


@pytest.mark.parametrize("fp8", [False, True], ids=["float32", "fp8"])
@pytest.mark.parametrize("name", list(KINDS))
def test_saved_file_reads_back_to_peft_output(tmp_path, name, fp8):
    """peft's adapted model == a fresh model with the written file applied by our reader (unfused)."""
    model, _ = _trained(name, fp8)
    want = _out(model)
    base = _out(_base(fp8))
    assert (want - base).abs().max() > 1e-2  # the adapters change the output
    path = write_lora(tmp_path / "a.safetensors", adapter_state_dict(model), P)
    fresh = _base(fp8)
    apply_loras(fresh, [(read_lora(path, P), 1.0, "a")])
    torch.testing.assert_close(_out(fresh), want, rtol=1e-5, atol=1e-5)


EXPECTED_KEYS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "lokr_both": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "lokr_full": {"lokr_w1", "lokr_w2"},
}


@pytest.mark.parametrize("name", list(KINDS))
def test_layout_metadata_and_exact_reload(tmp_path, name):
    """kohya names of the fused Linears with LyCORIS' suffixes and metadata; the file loads back into fresh
    peft adapters exactly (what --train.init_lora does)."""
    model, cfg = _trained(name, fp8=False)
    path = write_lora(tmp_path / "a.safetensors", adapter_state_dict(model), P)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"lora_unet_" + t.replace(".", "_") for t in TARGETS}
    assert {k.split(".", 1)[1] for k in keys} == EXPECTED_KEYS[name]
    if name == "dora":
        with safe_open(str(path), "pt") as f:
            assert f.get_tensor("lora_unet_single_blocks_0_linear1.dora_scale").shape == (P.hidden_size * 7, 1)
    if cfg.kind == "lora":
        assert meta["ss_network_module"] == "networks.lora_flux"
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        algo = json.loads(meta["ss_network_args"])["algo"]
        assert algo == ("lora" if cfg.kind == "dora" else cfg.kind)

    fresh = _base(False)
    inject_lora(fresh, cfg)
    load_adapter_weights(fresh, read_lora(path, P))
    # bit for bit, but where the file folds peft's scale into lokr_w1 (both factors full): one rounding there
    tol = 1e-6 if name == "lokr_full" else 0.0
    torch.testing.assert_close(_out(fresh), _out(model), rtol=tol, atol=tol)


def test_dora_on_fp8_reads_the_dequantized_weight():
    """peft would take an FP8Linear's raw e4m3 bytes (no scale) as DoRA's base weight; ours dequantizes it: at
    init the magnitude is each row's norm of the dequantized weight and the model's output is the base's."""
    model = _base(fp8=True)
    base = _out(model)
    inject_lora(model, _cfg("dora"))
    layer = adapter_layers(model)["single_blocks.1.linear2"]
    fp8 = layer.get_base_layer()
    assert isinstance(fp8, FP8Linear)
    m = layer.lora_magnitude_vector[ADAPTER].weight
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, fp8.dequantized_weight(torch.float32).norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(_out(model), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fp8", [False, True], ids=["float32", "fp8"])
@pytest.mark.parametrize("kind", ["lokr", "loha", "dora"])
def test_adapters_are_float32_and_start_as_the_base(kind, fp8):
    model = _base(fp8)
    base = _out(model)
    inject_lora(model, _cfg(kind))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
    assert all(("lora_" in n or "hada_" in n or "lokr_" in n) for n, _ in trainable)
    torch.testing.assert_close(_out(model), base, rtol=1e-6, atol=1e-6)


def test_converter_keeps_lycoris_kinds_and_refuses_diffusers_in_one_line(tmp_path, tiny_dev_dir, caplog):
    from flux_lora.weights.loading import flux_params

    params = flux_params(tiny_dev_dir)
    model = random_flux(params, seed=0).eval()
    inject_lora(model, LoraConfig(kind="loha", rank=4, alpha=2.0, targets=["single_blocks.0.linear1"]))
    _randomize(model)
    src = write_lora(tmp_path / "loha.safetensors", adapter_state_dict(model), params)
    out = tmp_path / "kohya.safetensors"
    assert convert([str(src), str(out), "--to", "kohya", "--model", str(tiny_dev_dir)]) == 0
    with safe_open(str(src), "pt") as a, safe_open(str(out), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    caplog.clear()
    bad = tmp_path / "diffusers.safetensors"
    assert convert([str(src), str(bad), "--to", "diffusers", "--model", str(tiny_dev_dir)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "plain LoRAs only" in errors[0] and "LoHa" in errors[0]
    assert not bad.exists()


def test_init_lora_of_another_kind_is_refused():
    model, _ = _trained("loha", fp8=False)
    weights = adapter_state_dict(model)
    other = _base(False)
    inject_lora(other, _cfg("lora"))
    with pytest.raises(ValueError, match="holds loha, the adapters being trained are lora"):
        load_adapter_weights(other, weights)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_block_targeting_and_rank_patterns(tmp_path, kind):
    from flux_lora.lora.lycoris import alpha_of, rank_of

    cfg = LoraConfig(
        kind=kind,  # type: ignore[arg-type]
        rank=4,
        alpha=4.0,
        double_blocks="1",
        single_blocks=[0],
        rank_pattern={"*_attn.*": 8, "*.linear1": 2},
        alpha_pattern={"*_mlp.*": 1.0},
    )
    model = _base(False)
    targets = inject_lora(model, cfg)
    assert targets == check_targets(cfg, P)  # what the run checks before loading
    assert targets and all(t.startswith(("double_blocks.1.", "single_blocks.0.")) for t in targets)
    assert "double_blocks.1.img_attn.qkv" in targets and "single_blocks.0.linear1" in targets
    weights = adapter_state_dict(model)
    ranks = {n: layer.r[ADAPTER] for n, layer in adapter_layers(model).items()}  # a LoKr factor may be full
    assert all(rank_of(weights[n]) in (r, None) for n, r in ranks.items())
    assert ranks["double_blocks.1.img_attn.qkv"] == 8 and ranks["double_blocks.1.txt_attn.proj"] == 8
    assert ranks["single_blocks.0.linear1"] == 2 and ranks["double_blocks.1.img_mlp.0"] == 4
    alphas = {n: alpha_of(w) for n, w in weights.items()}
    assert alphas["double_blocks.1.img_mlp.0"] == 1.0 and alphas["single_blocks.0.linear2"] == 4.0

    from flux_lora.lora.lycoris import training_metadata

    path = write_lora(tmp_path / "b.safetensors", weights, P, metadata=training_metadata(cfg))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    args = json.loads(meta["ss_network_args"])
    assert args["train_double_block_indices"] == "1" and args["train_single_block_indices"] == "0"
    assert meta["ss_network_dim"] == "Dynamic"
    recorded = json.loads(meta["flux_lora.adapter"])
    assert recorded["rank_pattern"] == {"*_attn.*": 8, "*.linear1": 2} and recorded["double_blocks"] == "1"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0-x", "'0-x' in '0-x' is not a block index or a range"),
        ("5-2", "'5-2'"),
        ([0, -1], "'-1'"),
        ("", "'' in '' is not a block index"),
    ],
)
def test_bad_block_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        LoraConfig(double_blocks=spec)
    assert "lora.double_blocks" in str(e.value) and "\n" not in str(e.value)


def test_block_indices_parse_and_check_depth():
    assert block_indices("0-3,8, 5", "k") == [0, 1, 2, 3, 5, 8]
    assert block_indices([7, 0, 7], "k") == [0, 7]
    assert block_indices(None, "k") is None
    with pytest.raises(ValueError, match=r"lora.single_blocks: '0-2' names block 2, but the model has 2 \(0-1\)"):
        check_targets(LoraConfig(single_blocks="0-2"), P)
    with pytest.raises(ValueError, match="lora.rank_pattern entry 'nothing.\\*' matches none"):
        check_targets(LoraConfig(rank_pattern={"nothing.*": 4}), P)
    with pytest.raises(ValueError, match="lora.kind must be one of"):
        LoraConfig(kind="lycoris")  # type: ignore[arg-type]


def test_bad_block_index_stops_the_run_before_any_model_loads(tmp_path, tiny_dev_dir, monkeypatch):
    from flux_lora.config_io import ConfigError
    from flux_lora.training import run as run_module

    from helpers.training import tiny_config

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad block index was reported")

    monkeypatch.setattr(run_module, "load_flow_model", refuse)
    monkeypatch.setattr(run_module.FluxDataModule, "from_model_folder", refuse)
    cfg = tiny_config(tmp_path, tiny_dev_dir, "--lora.double_blocks=0-7")
    with pytest.raises(ConfigError, match="lora.double_blocks: '0-7' names block 7, but the model has 2"):
        run_module.build(cfg)


def test_diffusers_layout_refuses_other_kinds(tmp_path):
    model, _ = _trained("lokr", fp8=False)
    with pytest.raises(LoraFormatError, match="diffusers layout holds plain LoRAs only"):
        write_lora(tmp_path / "x.safetensors", adapter_state_dict(model), P, layout="diffusers")


def test_peft_module_outputs_match_the_closed_forms_per_layer():
    """Layer by layer (no model around it): each peft layer's output == the base layer plus the reader's dense
    change applied to the input, for every kind (the same check as the whole-model one, with nothing to hide in)."""
    from flux_lora.lora.patches import dense_change
    from flux_lora.lora.runtime import float_weight

    for name in KINDS:
        model, _ = _trained(name, fp8=False)
        for path, layer in adapter_layers(model).items():
            base = layer.get_base_layer()
            x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(2))
            change = adapter_state_dict(model)[path]
            d, _ = dense_change(change, float_weight(base))
            with torch.no_grad():
                torch.testing.assert_close(layer(x), base(x) + x @ d.T, rtol=1e-5, atol=1e-5, msg=f"{name} {path}")


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_train_init_lora_starts_from_a_file_of_the_kind(tmp_path, tiny_dev_dir, kind):
    """--train.init_lora with lora.kind loha / dora: the run's adapters start as the file's, exactly."""
    from flux_lora.lora.lycoris import kohya_tensors
    from flux_lora.training.run import build
    from flux_lora.weights.loading import load_flow_model

    from helpers.training import tiny_config

    first = tiny_config(tmp_path / "a", tiny_dev_dir, f"--lora.kind={kind}")
    model = load_flow_model(tiny_dev_dir, dtype=torch.float32)
    inject_lora(model, first.lora)
    _randomize(model)
    path = write_lora(tmp_path / "init.safetensors", adapter_state_dict(model), model.params)
    cfg = tiny_config(tmp_path / "b", tiny_dev_dir, f"--lora.kind={kind}", f"--train.init_lora={path}")
    _, module, _ = build(cfg)
    module.configure_model()
    want, got = adapter_state_dict(model), module.lora_weights()
    assert want.keys() == got.keys()
    for name in want:
        a, b = kohya_tensors(name, want[name]), kohya_tensors(name, got[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
