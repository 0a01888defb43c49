"""FLUX.1 Kontext previews while training: a ``sample.prompts`` entry naming a reference image is drawn as
``pipe(prompt, image=reference)`` draws it, with the run's LoRA at that step, and its PNG records the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from flux_lora.config import DataError, load_config
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.lora.files import read_lora
from flux_lora.lora.runtime import apply_loras
from flux_lora.toy.pairs import INSTRUCTION, write_pairs
from flux_lora.training.run import build
from flux_lora.weights.tiny import write_tiny_model

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs/flux-kontext-dev_lora-r16_fp8.yaml"
SEED, STEPS, SIDE = 3, 2, 32


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "kontext", variant="kontext", seed=2)


def _config(tmp_path: Path, model: Path, pairs: tuple[Path, Path], prompts: str, *overrides: str):
    return load_config(
        CONFIG,
        [
            f"--model.source={model}",
            "--model.quantize=none",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.source={pairs[0]}",
            f"--data.references={pairs[1]}",
            f"--data.resolution={SIDE}",
            "--data.batch_size=2",
            "--lora.rank=4",
            "--lora.alpha=4",
            "--train.accelerator=cpu",
            "--train.devices=1",
            "--train.learning_rate=1e-2",
            "--train.warmup_steps=0",
            "--train.max_steps=2",
            "--train.save_every_n_steps=0",
            "--train.checkpoint_every_n_steps=0",
            "--model.gradient_checkpointing=false",
            "--save.dtype=fp32",  # the file holds the very adapters the preview was drawn with
            f"--sample.prompts={prompts}",
            *overrides,
        ],
    )


def _preview(reference: Path) -> str:
    return (
        f'[{{prompt: "{INSTRUCTION}", reference: "{reference}", reference_size: keep, seed: {SEED}, '
        f"steps: {STEPS}, height: {SIDE}, width: {SIDE}}}]"
    )


def _pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def test_a_reference_preview_is_the_kontext_pipeline_with_the_runs_lora(tmp_path, kontext_dir):
    pairs = write_pairs(tmp_path / "pairs", 2, seed=7, size=SIDE)
    reference = pairs[1] / "00001.png"
    cfg = _config(tmp_path, kontext_dir, pairs, _preview(reference), "--sample.at_start=true")
    trainer, module, datamodule = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    start, end = (cfg.output_path / "samples" / f"step{s:06d}-0.png" for s in (0, 2))
    meta = json.loads(Image.open(end).text["flux_lora"])
    assert (meta["reference_image"], meta["reference_size"], meta["step"]) == (str(reference), "keep", 2)
    assert "reference" not in meta  # named as generate.py names it

    pipe = FluxPipeline.from_pretrained(kontext_dir, dtype=torch.float32, device="cpu")
    ref = Image.open(reference).convert("RGB")
    kw = dict(height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance=meta["guidance"], seed=SEED)
    base = pipe(INSTRUCTION, image=ref, reference_size="keep", progress=False, **kw)[0]
    assert _pixels(start) == base.tobytes()  # step 0: the base model (the LoRA's up matrices are zero)
    no_reference = pipe(INSTRUCTION, progress=False, **kw)[0]
    assert no_reference.tobytes() != base.tobytes()  # the reference is used

    path = cfg.output_path / f"{cfg.name}.safetensors"
    with safe_open(path, "pt") as f:  # the dev value: no tool has a Kontext one (see lora.metadata.architecture)
        assert (f.metadata() or {})["modelspec.architecture"] == "flux-1-dev/lora"
    lora = read_lora(path, pipe.dit.params)
    apply_loras(pipe.dit, [(lora, 1.0, "run")])
    trained = pipe(INSTRUCTION, image=ref, reference_size="keep", progress=False, **kw)[0]
    assert _pixels(end) == trained.tobytes()  # the last step: the run's LoRA
    assert trained.tobytes() != base.tobytes()


def test_a_missing_preview_reference_is_one_line_naming_the_key(tmp_path, kontext_dir, monkeypatch):
    import flux_lora.training.run as run

    def no_model(cfg):
        raise AssertionError("the model was fetched before the previews were checked")

    monkeypatch.setattr(run, "fetch_model_folder", no_model)
    pairs = write_pairs(tmp_path / "pairs", 2, seed=7, size=SIDE)
    missing = tmp_path / "nowhere.png"
    prompts = f'["a plain preview", {{prompt: "x", reference: "{missing}"}}]'
    cfg = _config(tmp_path, kontext_dir, pairs, prompts)
    with pytest.raises(DataError, match=r"^sample\.prompts\[1\]\.reference: .*nowhere\.png: no such file$") as e:
        build(cfg)  # before any model is fetched or loaded
    assert "\n" not in str(e.value)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cfg = _config(
        tmp_path,
        kontext_dir,
        pairs,
        "[]",
        f'--sample.keep_prompts=[{{prompt: "x", reference: "{tmp_path / "bad.png"}"}}]',
    )
    with pytest.raises(DataError, match=r"^sample\.keep_prompts\[0\]\.reference: .*bad\.png: not a readable image"):
        build(cfg)
