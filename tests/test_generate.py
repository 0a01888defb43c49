"""examples/generate.py on the tiny model folder, in-process through its ``main(argv)``: PNGs with their
settings, deterministic for a seed. Its one run as a script is in test_entry_points.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_lora.model.flux import PRESETS
from flux_lora.weights.tiny import random_flux

from helpers.cli import GENERATE_ARGS, load_generate
from helpers.lora import random_lora


@pytest.fixture(scope="module")
def generate():
    return load_generate()


def _settings(path: Path) -> dict:
    return json.loads(Image.open(path).text["flux_lora"])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_writes_pngs_with_metadata_deterministically(tiny_dev_dir, tmp_path, generate):
    base = ["--model", str(tiny_dev_dir), *GENERATE_ARGS, "--seed", "5"]
    written = generate.main([*base, "--num-images", "2", "--output", str(tmp_path / "a.png")])
    first, second = tmp_path / "a-0.png", tmp_path / "a-1.png"
    assert written == [first, second]
    meta = _settings(first)
    assert meta["prompt"] == "a photo of a dog"
    assert (meta["seed"], meta["steps"], meta["guidance"]) == (5, 2, 3.5)
    assert (meta["model"], meta["loras"], meta["quantize"]) == (str(tiny_dev_dir), [], "none")
    assert Image.open(first).text["parameters"].startswith("a photo of a dog\nSteps: 2,")
    assert _settings(second)["seed"] == 6
    assert Image.open(first).size == (48, 32)
    assert not np.array_equal(_pixels(first), _pixels(second))  # different seed, different image

    # the same settings again, one image: the same file, byte for byte
    again = generate.main([*base, "--output", str(tmp_path / "b.png")])
    assert again == [tmp_path / "b.png"]
    assert (tmp_path / "b.png").read_bytes() == first.read_bytes()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left


def test_lora_changes_the_image_and_is_recorded(tiny_dev_dir, tmp_path, generate):
    lora_formats = pytest.importorskip("flux_lora.lora.files")
    if not hasattr(lora_formats, "write_lora"):
        pytest.skip("read_lora / write_lora are not merged yet")
    params = PRESETS["tiny"]
    paths = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_blocks.1.img_mlp.0"]
    lora_file = lora_formats.write_lora(
        tmp_path / "style.safetensors", random_lora(random_flux(params, 0), paths), params
    )
    base_args = ["--model", str(tiny_dev_dir), *GENERATE_ARGS, "--seed", "1"]
    plain = generate.main([*base_args, "--output", str(tmp_path / "plain.png")])[0]
    styled = generate.main([*base_args, "--lora", f"{lora_file}:0.7", "--output", str(tmp_path / "l.png")])[0]
    zero = generate.main([*base_args, "--lora", f"{lora_file}:0", "--output", str(tmp_path / "z.png")])[0]
    assert _settings(styled)["loras"] == ["style.safetensors:0.7"]
    assert not np.array_equal(_pixels(styled), _pixels(plain))
    assert np.array_equal(_pixels(zero), _pixels(plain))


def test_bad_arguments(tiny_dev_dir, tmp_path, generate, capsys):
    with pytest.raises(SystemExit):
        generate.main(
            ["--model", str(tiny_dev_dir), *GENERATE_ARGS, "--lora", str(tmp_path / "missing.safetensors:0.5")]
        )
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    assert generate.lora_spec("C:\\loras\\a.safetensors") == (Path("C:\\loras\\a.safetensors"), 1.0)
    assert generate.lora_spec("dir/a.b.safetensors:-0.25") == (Path("dir/a.b.safetensors"), -0.25)


# ------------------------------------------------------------------------------------------ ControlNets


def _control_images(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    edges, low = tmp_path / "edges.png", tmp_path / "low.png"
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(edges)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(low)  # tile: the low-resolution image
    return edges, low


def test_cli_with_controlnets_records_them(
    tiny_dev_dir, tiny_controlnet_dir, tiny_union_controlnet_dir, tmp_path, generate
):
    edges, low = _control_images(tmp_path)
    base = ["--model", str(tiny_dev_dir), *GENERATE_ARGS, "--seed", "3"]
    controls = [
        *("--controlnet", f"{tiny_controlnet_dir}:0.8", "--control-image", str(edges)),
        *("--controlnet", str(tiny_union_controlnet_dir), "--control-mode", "tile", "--control-image", str(low)),
        *("--control-end", "0.5"),
    ]
    assert generate.main([*base, *controls, "--output", str(tmp_path / "cn.png")]) == [tmp_path / "cn.png"]
    recorded = _settings(tmp_path / "cn.png")["controlnets"]
    assert recorded == [
        {
            "controlnet": str(tiny_controlnet_dir),
            "scale": 0.8,
            "image": str(edges),
            "mode": None,
            "mask": None,
            "start": 0.0,
            "end": 1.0,
        },
        {
            "controlnet": str(tiny_union_controlnet_dir),
            "scale": 1.0,
            "image": str(low),
            "mode": "tile",
            "mask": None,
            "start": 0.0,
            "end": 0.5,
        },
    ]
    plain = generate.main([*base, "--output", str(tmp_path / "plain.png")])[0]
    assert _settings(plain)["controlnets"] == []
    assert not np.array_equal(_pixels(tmp_path / "cn.png"), _pixels(plain))
    zero = generate.main(
        [
            *base,
            "--controlnet",
            f"{tiny_controlnet_dir}:0",
            "--control-image",
            str(edges),
            "--output",
            str(tmp_path / "zero.png"),
        ]
    )[0]
    assert np.array_equal(_pixels(zero), _pixels(plain))  # scale 0 adds zero residuals


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control-image", "{edges}"], "--control-image .*: give --controlnet first"),
        (
            ["--controlnet", "{cn}", "--controlnet", "{cn}", "--control-image", "{edges}"],
            "--controlnet .* has no --control-image \\(2 ControlNets, 1 control images",
        ),
        (
            ["--controlnet", "{cn}", "--control-image", "{edges}", "--control-image", "{edges}"],
            "--control-image given twice for --controlnet",
        ),
        (["--controlnet", "{cn}", "--control-image", "{missing}"], "--control-image .*missing.png: no such file"),
    ],
)
def test_bad_controlnet_arguments(extra, message, tiny_dev_dir, tiny_controlnet_dir, tmp_path, generate, capsys):
    edges, _ = _control_images(tmp_path)
    paths = dict(edges=edges, cn=tiny_controlnet_dir, missing=tmp_path / "missing.png")
    with pytest.raises(SystemExit):
        generate.parse_args(["--model", str(tiny_dev_dir), *GENERATE_ARGS, *(a.format(**paths) for a in extra)])
    assert re.search(message, capsys.readouterr().err)
    assert generate.split_scale("InstantX/FLUX.1-dev-Controlnet-Union:0.6") == (
        "InstantX/FLUX.1-dev-Controlnet-Union",
        0.6,
    )
