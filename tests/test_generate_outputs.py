"""examples/generate.py: one-line errors before the DiT loads, PNG metadata other tools read, no overwrite, umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flux_lora.inference import pipeline as pipeline_module
from flux_lora.inference.outputs import a1111_parameters
from flux_lora.lora.files import to_kohya_state_dict, write_lora
from flux_lora.lora.weight import LoraWeight
from flux_lora.model.flux import PRESETS

from helpers.cli import load_generate

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
ARGS = ["--prompt", "a dog, in the rain", "--height", "32", "--width", "32", "--steps", "1"]
ARGS += ["--dtype", "float32", "--device", "cpu", "--quiet", "--seed", "3"]
P = PRESETS["tiny"]
QKV = "double_blocks.0.img_attn.qkv"


@pytest.fixture(scope="module")
def generate():
    return load_generate()


@pytest.fixture
def no_dit(monkeypatch):
    """Loading the DiT fails the test: errors must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the DiT was loaded before the bad input was reported")

    monkeypatch.setattr(pipeline_module, "load_flow_model", refuse)


def _lora(seed: int = 0) -> dict[str, LoraWeight]:
    g = torch.Generator().manual_seed(seed)
    return {
        QKV: LoraWeight(torch.randn(2, P.hidden_size, generator=g), torch.randn(3 * P.hidden_size, 2, generator=g), 2.0)
    }


def _bad_lora(tmp_path: Path, kind: str) -> Path:
    sd = to_kohya_state_dict(_lora(), P)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    if kind == "nan":
        sd[f"{key}.lora_up.weight"][0, 0] = float("nan")
    else:  # a BFL control LoRA's norm override: not applied
        sd["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(P.hidden_size // P.num_heads)
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("kind, message", [("nan", "NaN or Inf"), ("norm", "norm overrides")])
def test_bad_lora_is_one_line_before_the_dit_loads(kind, message, tiny_dev_dir, tmp_path, generate, no_dit, caplog):
    lora = _bad_lora(tmp_path, kind)
    out = tmp_path / "x.png"
    assert generate.cli(["--model", str(tiny_dev_dir), *ARGS, "--lora", str(lora), "--output", str(out)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and str(lora) in errors[0] and "\n" not in errors[0]
    assert not out.exists()


def test_bad_control_image_and_controlnet_fail_before_the_dit(
    tiny_dev_dir, tiny_controlnet_dir, tmp_path, generate, no_dit, caplog
):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    base = ["--model", str(tiny_dev_dir), *ARGS, "--output", str(tmp_path / "x.png")]
    assert generate.cli([*base, "--controlnet", str(tiny_controlnet_dir), "--control-image", str(broken)]) == 1
    assert "--control-image" in caplog.text and "broken.png: not a readable image" in caplog.text
    other = tmp_path / "other-cn"
    shutil.copytree(tiny_controlnet_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["joint_attention_dim"] = config["joint_attention_dim"] * 2
    (other / "config.json").write_text(json.dumps(config))
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32)).save(good)
    caplog.clear()
    assert generate.cli([*base, "--controlnet", str(other), "--control-image", str(good)]) == 1
    assert "built for another base model" in caplog.text and "T5 width" in caplog.text


def test_bad_autoencoder_fails_before_the_dit(tiny_dev_dir, tmp_path, no_dit):
    model = tmp_path / "model"
    shutil.copytree(tiny_dev_dir, model)
    (model / "ae.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="ae.safetensors"):
        pipeline_module.FluxPipeline.from_pretrained(model, dtype=torch.float32, device="cpu")


def test_script_prints_one_line_and_exits_1_and_nothing_when_quiet(tiny_dev_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--model", str(tmp_path / "nowhere"), *ARGS]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "nowhere" in done.stderr
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_dev_dir), *ARGS]  # --quiet: errors only
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert (tmp_path / "output_00001.png").is_file()


# ----------------------------------------------------------------------------------------------- outputs


def test_png_metadata_numbering_overwrite_and_umask(tiny_dev_dir, tmp_path, generate, monkeypatch):
    lora = write_lora(tmp_path / "style.safetensors", _lora(), P)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o027)
    try:
        first = generate.main(["--model", str(tiny_dev_dir), *ARGS, "--lora", f"{lora}:0.5", "--num-images", "2"])
        again = generate.main(["--model", str(tiny_dev_dir), *ARGS])
    finally:
        os.umask(old)
    assert first == [tmp_path / "output_00001.png", tmp_path / "output_00002.png"]
    assert again == [tmp_path / "output_00003.png"]
    assert (first[0].stat().st_mode & 0o777) == 0o640

    text = Image.open(first[0]).text
    assert set(text) == {"parameters", "flux_lora"}  # no plain-text `prompt` chunk for ComfyUI to JSON.parse
    settings = json.loads(text["flux_lora"])
    assert (settings["seed"], settings["prompt"], settings["loras"]) == (
        3,
        "a dog, in the rain",
        ["style.safetensors:0.5"],
    )
    assert json.loads(Image.open(first[1]).text["flux_lora"])["seed"] == 4
    sha = hashlib.sha256(lora.read_bytes()).hexdigest()[:10]
    prompt, params = text["parameters"].split("\n")
    assert prompt == "a dog, in the rain"
    assert params.startswith(
        "Steps: 1, Sampler: Euler, Schedule type: Simple, CFG scale: 1.0, Distilled CFG Scale: 3.5, "
    )
    assert "Seed: 3, Size: 32x32, Model: " in params and f'Lora hashes: "style: {sha}"' in params

    # an explicit --output that exists needs --overwrite; the file is left alone without it
    target = tmp_path / "mine.png"
    target.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="mine.png exists; pass --overwrite"):
        generate.main(["--model", str(tiny_dev_dir), *ARGS, "--output", str(target)])
    assert target.read_bytes() == b"keep me"
    generate.main(["--model", str(tiny_dev_dir), *ARGS, "--output", str(target), "--overwrite"])
    assert np.asarray(Image.open(target)).shape == (32, 32, 3)


def test_a1111_text_with_negative_prompt_and_true_cfg():
    text = a1111_parameters(
        {
            "prompt": "cat",
            "negative_prompt": "blurry",
            "true_cfg": 4.0,
            "guidance": None,
            "seed": 1,
            "steps": 4,
            "width": 64,
            "height": 48,
            "model": "/m/FLUX.1-schnell",
        }
    )
    assert text.splitlines()[:2] == ["cat", "Negative prompt: blurry"]
    assert "CFG scale: 4.0" in text and "Distilled CFG" not in text and "Model: FLUX.1-schnell" in text


def test_text_encoder_parts_change_the_image(tiny_dev_dir, tmp_path, generate, caplog):
    g = torch.Generator().manual_seed(5)
    te = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    sd = {
        f"{te}.lora_down.weight": torch.randn(2, 32, generator=g),
        f"{te}.lora_up.weight": torch.randn(37, 2, generator=g),
    }
    path = tmp_path / "te.safetensors"
    save_file(sd, str(path))
    base = ["--model", str(tiny_dev_dir), *ARGS]
    assert generate.cli([*base, "--lora", str(path), "--output", str(tmp_path / "bad.png")]) == 1
    assert "do not fit" in caplog.text and te in caplog.text  # fc1 of the tiny CLIP is not 37 wide
    fc1 = generate.FluxPipeline.from_pretrained(tiny_dev_dir, dtype=torch.float32, device="cpu").text_encoders
    fc1 = fc1.get_submodule("clip.encoder.layers.0.mlp.fc1")
    sd[f"{te}.lora_down.weight"] = torch.randn(2, fc1.in_features, generator=g)
    sd[f"{te}.lora_up.weight"] = torch.randn(fc1.out_features, 2, generator=g)
    save_file(sd, str(path))
    plain = generate.main([*base, "--output", str(tmp_path / "plain.png")])[0]
    styled = generate.main([*base, "--lora", str(path), "--output", str(tmp_path / "te.png")])[0]
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(styled)))
