"""examples/generate.py on the tiny model folder: PNGs with their settings, deterministic for a seed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_dit import random_lora
from PIL import Image

from flux_lora.model import PRESETS
from flux_lora.tiny import random_flux

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
ARGS = ["--prompt", "a photo of a dog", "--height", "32", "--width", "48", "--steps", "2", "--dtype", "float32",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("generate_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_writes_pngs_with_metadata_deterministically(tiny_dev_dir, tmp_path, generate):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_dev_dir), *ARGS, "--seed", "5", "--num-images", "2",
           "--output", str(tmp_path / "a.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    first, second = tmp_path / "a-0.png", tmp_path / "a-1.png"
    meta = Image.open(first).text
    assert meta["prompt"] == "a photo of a dog"
    assert (meta["seed"], meta["steps"], meta["guidance"]) == ("5", "2", "3.5")
    assert (meta["model"], meta["loras"], meta["quantize"]) == (str(tiny_dev_dir), "[]", "none")
    assert json.loads(meta["parameters"])["seed"] == 5
    assert Image.open(second).text["seed"] == "6"
    assert Image.open(first).size == (48, 32)
    assert not np.array_equal(_pixels(first), _pixels(second))  # different seed, different image

    # the same settings again (in-process this time): the same file, byte for byte
    again = generate.main(["--model", str(tiny_dev_dir), *ARGS, "--seed", "5", "--output", str(tmp_path / "b.png")])
    assert again == [tmp_path / "b.png"]
    assert (tmp_path / "b.png").read_bytes() == first.read_bytes()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left


def test_lora_changes_the_image_and_is_recorded(tiny_dev_dir, tmp_path, generate):
    lora_formats = pytest.importorskip("flux_lora.lora_formats")
    if not hasattr(lora_formats, "write_lora"):
        pytest.skip("read_lora / write_lora are not merged yet")
    params = PRESETS["tiny"]
    paths = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_blocks.1.img_mlp.0"]
    lora_file = lora_formats.write_lora(tmp_path / "style.safetensors", random_lora(random_flux(params, 0), paths),
                                        params)
    base_args = ["--model", str(tiny_dev_dir), *ARGS, "--seed", "1"]
    plain = generate.main([*base_args, "--output", str(tmp_path / "plain.png")])[0]
    styled = generate.main([*base_args, "--lora", f"{lora_file}:0.7", "--output", str(tmp_path / "l.png")])[0]
    zero = generate.main([*base_args, "--lora", f"{lora_file}:0", "--output", str(tmp_path / "z.png")])[0]
    assert Image.open(styled).text["loras"] == '["style.safetensors:0.7"]'
    assert not np.array_equal(_pixels(styled), _pixels(plain))
    assert np.array_equal(_pixels(zero), _pixels(plain))


def test_bad_arguments(tiny_dev_dir, tmp_path, generate, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--model", str(tiny_dev_dir), *ARGS, "--lora", str(tmp_path / "missing.safetensors:0.5")])
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    assert generate.lora_spec("C:\\loras\\a.safetensors") == (Path("C:\\loras\\a.safetensors"), 1.0)
    assert generate.lora_spec("dir/a.b.safetensors:-0.25") == (Path("dir/a.b.safetensors"), -0.25)
