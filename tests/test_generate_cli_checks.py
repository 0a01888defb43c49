"""generate's command line: help once, sizes and steps checked before the model loads, no library progress
bars, guidance recorded only where the model uses it, and a prompt file for many prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux_lora.inference.pipeline import FluxPipeline

from helpers.cli import GENERATE, GENERATE_ARGS, load_generate, run_python


@pytest.fixture(scope="module")
def generate():
    return load_generate()


def _settings(path: Path) -> dict:
    return json.loads(Image.open(path).text["flux_lora"])


def test_help_prints_the_description_once(generate, capsys):
    with pytest.raises(SystemExit) as e:
        generate.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    first = generate.__doc__.splitlines()[0]
    assert out.count(first) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--height", "0"], "--height must be at least 16, got 0"),
        (["--width", "-32"], "--width must be at least 16, got -32"),
        (["--height", "8"], "--height must be at least 16, got 8"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
    ],
)
def test_bad_sizes_and_steps_stop_before_the_model_loads(extra, message, tiny_dev_dir, tmp_path, generate, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    args = ["--model", str(tiny_dev_dir), *GENERATE_ARGS, *extra, "--output", str(tmp_path / "x.png")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FluxPipeline, "from_pretrained", no_load)
        with pytest.raises(SystemExit) as e:
            generate.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_library_progress_bars(tiny_dev_dir, tmp_path):
    """As a program (the bars are transformers' own, shown in a fresh process): our denoising bar only."""
    args = [a for a in GENERATE_ARGS if a != "--quiet"]
    done = run_python(
        str(GENERATE), "--model", str(tiny_dev_dir), *args, "--seed", "1", "--output", "a.png", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "denoising" in done.stderr


def test_guidance_is_recorded_only_where_the_model_uses_it(tiny_dev_dir, tmp_path, generate):
    """The toy model's guidance input is held at zero (its out_layer is zero): guidance changes nothing, so the
    PNG records none; the tiny dev model uses it and records 3.5."""
    unused = tmp_path / "no-guidance"
    shutil.copytree(tiny_dev_dir, unused)
    dit = next(unused.glob("flux1-*.safetensors"))
    weights = load_file(dit)
    with safe_open(dit, "pt") as f:
        metadata = f.metadata()
    for key in ("guidance_in.out_layer.weight", "guidance_in.out_layer.bias"):
        weights[key] = weights[key].zero_()
    save_file(weights, dit, metadata=metadata)
    base = [*GENERATE_ARGS, "--seed", "1"]
    zero = generate.main(["--model", str(unused), *base, "--output", str(tmp_path / "z.png")])[0]
    used = generate.main(["--model", str(tiny_dev_dir), *base, "--output", str(tmp_path / "u.png")])[0]
    assert "Distilled CFG Scale" not in Image.open(zero).text["parameters"]
    assert _settings(zero)["guidance"] is None
    assert "Distilled CFG Scale: 3.5" in Image.open(used).text["parameters"]


def test_a_prompt_file_makes_one_image_per_prompt_and_seed(tiny_dev_dir, tmp_path, generate, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square, large  \n")
    args = [a for a in GENERATE_ARGS if a not in ("--prompt", "a photo of a dog")]
    base = ["--model", str(tiny_dev_dir), *args, "--prompt-file", str(prompts)]
    written = generate.main([*base, "--seed", "3", "4", "--output", str(tmp_path / "p.png")])
    assert written == [tmp_path / f"p-{i}.png" for i in range(4)]
    got = [(_settings(p)["prompt"], _settings(p)["seed"]) for p in written]
    assert got == [("a red circle", 3), ("a red circle", 4), ("a blue square, large", 3), ("a blue square, large", 4)]
    one = generate.main(
        [
            "--model",
            str(tiny_dev_dir),
            *GENERATE_ARGS[2:],
            "--prompt",
            "a blue square, large",
            "--seed",
            "4",
            "--output",
            str(tmp_path / "one.png"),
        ]
    )[0]
    assert one.read_bytes() == written[3].read_bytes()  # the same image as from the command line
    with pytest.raises(SystemExit):
        generate.main([*base, "--prompt", "x"])
    assert "not allowed with argument" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(SystemExit):
        generate.main(["--model", str(tiny_dev_dir), *args, "--prompt-file", str(tmp_path / "empty.txt")])
    assert "empty.txt holds no prompt" in capsys.readouterr().err
