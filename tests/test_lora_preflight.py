"""LoRA text-encoder parts are checked against the encoders' config.json before any model loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flux_lora.inference import pipeline as pipeline_module
from flux_lora.model.text_encoders import TextEncoders

from helpers.cli import load_generate

ARGS = ["--prompt", "a dog", "--height", "32", "--width", "32", "--steps", "1"]
ARGS += ["--dtype", "float32", "--device", "cpu", "--quiet", "--seed", "3"]
FC1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading the DiT, the autoencoder or the text encoders fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad LoRA was reported")

    for name in ("load_flow_model", "load_autoencoder"):
        monkeypatch.setattr(pipeline_module, name, refuse)
    monkeypatch.setattr(TextEncoders, "from_folder", refuse)


def test_skeleton_has_the_loaded_encoders_names_and_shapes(tiny_dev_dir):
    real = TextEncoders.from_folder(tiny_dev_dir, 16, dtype=torch.float32)
    meta = TextEncoders.skeleton(tiny_dev_dir, 16)
    shapes = {n: (p.shape, p.is_meta) for n, p in meta.named_parameters()}
    assert shapes == {n: (p.shape, True) for n, p in real.named_parameters()}


@pytest.mark.parametrize("rows", [37, None])
def test_wrong_text_encoder_shape_fails_in_one_line_before_any_model_loads(
    rows, tiny_dev_dir, tmp_path, nothing_loads, caplog
):
    meta = TextEncoders.skeleton(tiny_dev_dir, 16).get_submodule("clip.encoder.layers.0.mlp.fc1")
    g = torch.Generator().manual_seed(0)
    sd = {
        f"{FC1}.lora_down.weight": torch.randn(2, meta.in_features, generator=g),
        f"{FC1}.lora_up.weight": torch.randn(rows or meta.out_features, 2, generator=g),
    }
    if rows is None:  # right shapes, an unknown module: refused the same way
        sd["lora_te1_text_model_encoder_layers_9_mlp_fc1.lora_down.weight"] = torch.zeros(2, meta.in_features)
    path = tmp_path / "te.safetensors"
    save_file(sd, str(path))
    out = tmp_path / "x.png"
    generate = load_generate()
    assert generate.cli(["--model", str(tiny_dev_dir), *ARGS, "--lora", str(path), "--output", str(out)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and str(path) in errors[0]
    assert (FC1 if rows else "layers_9_mlp_fc1") in errors[0]
    assert not out.exists()
