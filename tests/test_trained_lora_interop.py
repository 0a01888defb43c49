"""(a) A LoRA our trainer made, read by diffusers' own LoRA loader, gives the output our pipeline gives with it."""

import pytest
import torch

from flux_lora.lora.convert import main as convert
from flux_lora.lora.files import read_lora
from flux_lora.lora.runtime import apply_loras
from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config
from flux_lora.weights.loading import load_flow_model
from flux_lora.weights.safetensors_io import read_keys

from helpers.dit import dit_inputs
from helpers.numerics import assert_same_output
from helpers.parity import adapter_state, diffusers_forward, load_with_diffusers, transformer_pipeline
from helpers.training import fit, tiny_config

diffusers = pytest.importorskip("diffusers")


def test_trained_lora_loads_in_diffusers_and_matches_our_pipeline(tmp_path, tiny_dev_dir, caplog):
    cfg = tiny_config(
        tmp_path,
        tiny_dev_dir,
        "--max_steps=30",
        "--learning_rate=3e-3",
        "--quantize=float8_e4m3fn",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
    )
    fit(cfg)
    kohya = cfg.output_path / "tiny.safetensors"
    # tiny widths go through the diffusers layout (diffusers' kohya converter hard-codes hidden 3072)
    as_diffusers = tmp_path / "pytorch_lora_weights.safetensors"
    assert convert([str(kohya), str(as_diffusers), "--to", "diffusers", "--model", str(tiny_dev_dir)]) in (0, None)

    ours = load_flow_model(tiny_dev_dir, dtype=torch.float32)
    theirs = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(ours.params)).eval()
    theirs.load_state_dict(flux_to_diffusers(ours.state_dict(), ours.params), strict=True)
    x = dit_inputs(ours.params, lat_h=4, lat_w=6, txt_len=5)
    with torch.no_grad():
        base = ours(**x)

    warnings = load_with_diffusers(transformer_pipeline(theirs), as_diffusers, caplog)
    assert warnings == []
    loaded = {k.replace(".default_0", "") for k in adapter_state(theirs)}
    assert {k.removeprefix("transformer.") for k in read_keys(as_diffusers)} == loaded  # no key left unloaded

    apply_loras(ours, [(read_lora(kohya, ours.params), 1.0, "trained")])
    with torch.no_grad():
        got = ours(**x)
    assert_same_output(got, diffusers_forward(theirs, x), base)
