"""(a) A LoRA our trainer made, read by diffusers' own LoRA loader, gives the output our pipeline gives with it."""

import pytest
import torch

from flux_lora.lora.convert import main as convert
from flux_lora.lora.files import read_lora
from flux_lora.lora.runtime import apply_loras
from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config
from flux_lora.weights.loading import load_flow_model
from flux_lora.weights.safetensors_io import read_keys

diffusers = pytest.importorskip("diffusers")

from test_lora_interop import (  # noqa: E402
    _adapter_state,
    _assert_same,
    _diffusers_out,
    _inputs,
    _load_with_diffusers,
    _pipeline,  # noqa: E402
)
from test_train import fit, tiny_config  # noqa: E402


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
    x = _inputs(ours.params)
    with torch.no_grad():
        base = ours(**x)

    warnings = _load_with_diffusers(_pipeline(theirs), as_diffusers, caplog)
    assert warnings == []
    loaded = {k.replace(".default_0", "") for k in _adapter_state(theirs)}
    assert {k.removeprefix("transformer.") for k in read_keys(as_diffusers)} == loaded  # no key left unloaded

    apply_loras(ours, [(read_lora(kohya, ours.params), 1.0, "trained")])
    with torch.no_grad():
        got = ours(**x)
    _assert_same(got, _diffusers_out(theirs, x), base)
