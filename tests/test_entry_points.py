"""One run of each entry point as a script, in a fresh process: ``python train.py``, ``python
examples/generate.py``, ``python -m flux_lora.lora.convert``, ``python -m flux_lora.weights.tiny``. They prove
the script wiring (imports from a checkout, ``__main__``, exit codes, logging to stderr); what the commands do is
tested in-process through each ``main(argv)`` (test_module.py, test_generate.py, test_lora_formats.py,
test_controlnet_loading.py)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from flux_lora.lora.files import read_lora, write_lora
from flux_lora.lora.keys import detect_layout, linear_shapes
from flux_lora.model.flux import PRESETS
from flux_lora.weights.safetensors_io import read_keys

from helpers.cli import GENERATE, GENERATE_ARGS, load_generate, run_python
from helpers.lora import random_lora

ROOT = Path(__file__).resolve().parents[1]


def _tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_train_py_exits_2_on_a_bad_config(tmp_path):
    done = run_python(
        str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"), "--lora.rnak", "4", cwd=tmp_path
    )
    assert done.returncode == 2 and "did you mean 'lora.rank'" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_generate_py_writes_the_png_main_writes(tiny_dev_dir, tmp_path):
    args = ["--model", str(tiny_dev_dir), *GENERATE_ARGS, "--seed", "5"]
    done = run_python(str(GENERATE), *args, "--output", str(tmp_path / "a.png"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    again = load_generate().main([*args, "--output", str(tmp_path / "b.png")])[0]
    assert (tmp_path / "a.png").read_bytes() == again.read_bytes()  # another process, the same bytes


def test_convert_module_converts(tmp_path):
    tiny = PRESETS["tiny"]
    lora = random_lora(tiny, sorted(linear_shapes(tiny)), rank=3, alpha=5.0, seed=11)
    kohya = write_lora(tmp_path / "in.safetensors", lora, tiny)
    out = tmp_path / "out.safetensors"
    done = run_python(
        "-m", "flux_lora.lora.convert", str(kohya), str(out), "--to", "diffusers", "--model", "tiny", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr and detect_layout(read_keys(out)) == "diffusers"
    assert read_lora(out, tiny).keys() == lora.keys()


def test_tiny_module_writes_the_fixture_model(tiny_dev_dir, tmp_path):
    """The same folder as the session's tiny dev model (seed 0), tensor for tensor."""
    done = run_python(
        "-m", "flux_lora.weights.tiny", str(tmp_path / "m"), "--seed", "0", "--no-controlnets", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    written = sorted(p.relative_to(tmp_path / "m") for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(tiny_dev_dir) for p in tiny_dev_dir.rglob("*") if p.is_file())
    for name in ("flux1-dev.safetensors", "ae.safetensors"):
        ours, fixture = _tensors(tmp_path / "m" / name), _tensors(tiny_dev_dir / name)
        assert ours.keys() == fixture.keys() and all(ours[k].equal(fixture[k]) for k in ours), name
