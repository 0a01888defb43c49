"""Regularization images: drawn once by the base model from class prompts (a rerun loads no sampler), keyed by
model, prompt, seed and sampler settings; or a folder of the user's marked as regularization. Either way their
own loss weight reaches the loss, and bad settings stop with one line before any model loads."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train
from flux_lora.config import RegularizationImages
from flux_lora.config_io import ConfigError
from flux_lora.data.datamodule import FluxDataModule
from flux_lora.data.scan import scan_all
from flux_lora.inference.outputs import SETTINGS_CHUNK
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.training import regularization as R
from flux_lora.training.loss import weighted_mse
from flux_lora.training.run import with_regularization
from flux_lora.weights.loading import flux_params

from helpers.training import fit, tiny_config

ROOT = Path(__file__).parents[1]
PROMPTS = ["a red circle on a white background", "a blue square on a green background"]


def generated(*extra: str, prompts: list[str] = PROMPTS, count: int = 2) -> list[str]:
    """Overrides: examples/data plus an entry of ``count`` images per prompt drawn by the model (2 steps)."""
    entry = {"generate": {"prompts": prompts, "images_per_prompt": count, "steps": 2, "seed": 5}, "loss_weight": 0.5}
    return [f"--data.datasets={json.dumps([{'source': str(ROOT / 'examples/data')}, entry])}", *extra]


def no_sampler(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a sampler was loaded")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", refuse)


def test_generated_once_then_reused_without_a_sampler(tmp_path, tiny_dev_dir, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_dev_dir, "--data.trigger_word=sks", *generated())
    resolved = with_regularization(cfg)
    entry = resolved.data.datasets[1]
    folder = Path(entry.source)
    assert entry.generate is None and entry.regularization and entry.loss_weight == 0.5
    assert folder.parent == tmp_path / "cache" / "regularization"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (64, 64)
            recorded = json.loads(image.info[SETTINGS_CHUNK])
        assert png.with_suffix(".txt").read_text() == recorded["prompt"]
    assert [json.loads(Image.open(p).info[SETTINGS_CHUNK])["seed"] for p in pngs] == [5, 6, 7, 8]
    before = {p.name: p.read_bytes() for p in pngs}

    no_sampler(monkeypatch)  # a rerun finds them all and loads nothing
    again = with_regularization(tiny_config(tmp_path, tiny_dev_dir, "--data.trigger_word=sks", *generated()))
    assert again.data.datasets[1].source == entry.source
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))} == before

    scanned = scan_all(again.data)  # then they are plain training data: no trigger word, their loss weight
    reg = [r for r in scanned.records if r.part == 1]
    assert sorted(r.caption for r in reg) == sorted(PROMPTS * 2)
    assert {r.loss_weight for r in reg} == {0.5} and {r.loss_weight for r in scanned.records if r.part == 0} == {1.0}
    assert all(r.caption.startswith("sks, ") for r in scanned.records if r.part == 0)


def test_an_interrupted_generation_draws_only_what_is_missing(tmp_path, tiny_dev_dir, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_dev_dir, *generated())
    folder = Path(with_regularization(cfg).data.datasets[1].source)
    first = folder / sorted(p.name for p in folder.glob("*.png"))[0]
    kept = first.read_bytes()
    last = sorted(folder.glob("*.png"))[-1]
    drawn = last.read_bytes()
    last.unlink()
    calls = []
    original = FluxPipeline.__call__

    def counting(self, prompt=None, **kwargs):
        calls.append(list(prompt))
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", counting)
    with_regularization(cfg)
    assert calls == [[PROMPTS[1]]]
    assert first.read_bytes() == kept
    # its own seed's noise: the same picture drawn alone as in a batch of 4 (up to batched-matmul rounding)
    alone = np.asarray(Image.open(last), dtype=np.int16)
    batched = np.asarray(Image.open(io.BytesIO(drawn)), dtype=np.int16)
    assert np.abs(alone - batched).max() <= 2


def test_the_folder_key_changes_with_model_prompt_seed_and_sampler_settings():
    gen = RegularizationImages(prompts=["a circle", "a square on the left"], images_per_prompt=2, seed=3)
    sampler = R.Sampler("model-a", "float32", None, "blocks", 64, 20, 3.5)
    key = R.set_key(sampler, R.images_of(gen))
    assert R.set_key(sampler, R.images_of(gen)) == key  # stable
    variants = {
        "model": R.set_key(replace(sampler, model="model-b"), R.images_of(gen)),
        "prompt": R.set_key(sampler, R.images_of(replace(gen, prompts=["a circle", "a square on the right"]))),
        "seed": R.set_key(sampler, R.images_of(replace(gen, seed=4))),
        "count": R.set_key(sampler, R.images_of(replace(gen, images_per_prompt=3))),
        "steps": R.set_key(replace(sampler, steps=28), R.images_of(gen)),
        "guidance": R.set_key(replace(sampler, guidance=2.0), R.images_of(gen)),
        "size": R.set_key(replace(sampler, size=128), R.images_of(gen)),
        "dtype": R.set_key(replace(sampler, dtype="bfloat16"), R.images_of(gen)),
        "quantize": R.set_key(replace(sampler, quantize="float8_e4m3fn"), R.images_of(gen)),
    }
    assert key not in variants.values() and len(set(variants.values())) == len(variants)
    assert R.set_key(sampler, R.images_of(replace(gen, batch_size=1))) == key  # batching does not change pixels


def test_the_model_fingerprint_is_part_of_the_folder(tmp_path, tiny_dev_dir):
    """The same settings on another model's files (one byte of the autoencoder changed) get another folder."""
    other = tmp_path / "other-model"
    shutil.copytree(tiny_dev_dir, other)
    ae = other / "ae.safetensors"
    data = bytearray(ae.read_bytes())
    data[-1] ^= 1
    ae.write_bytes(bytes(data))
    a = with_regularization(tiny_config(tmp_path, tiny_dev_dir, *generated(count=1)))
    b = with_regularization(tiny_config(tmp_path, other, *generated(count=1)))
    assert a.data.datasets[1].source != b.data.datasets[1].source


def test_sample_weights_in_the_loss_closed_form():
    """loss = mean_b(w_b * lw(t_b) * mse_b) on a batch of 3 one-token samples."""
    pred = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]], [[3.0, 1.0]]])
    target = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[1.0, 1.0]]])
    t = torch.tensor([0.2, 0.5, 0.9])
    mse = [(1 + 4) / 2, (1 + 1) / 2, (4 + 0) / 2]
    w = [1.0, 0.25, 2.0]
    got = weighted_mse(pred, target, t, "none", sample_weight=torch.tensor(w)).item()
    assert got == pytest.approx(sum(m * x for m, x in zip(mse, w, strict=True)) / 3)  # 1.5833
    assert weighted_mse(pred, target, t, "none").item() == pytest.approx(sum(mse) / 3)
    sigma = [min(x**-2.0, 1e4) for x in t.tolist()]
    got = weighted_mse(pred, target, t, "sigma_sqrt", sample_weight=torch.tensor(w)).item()
    assert got == pytest.approx(sum(m * s * x for m, s, x in zip(mse, sigma, w, strict=True)) / 3, rel=1e-6)


def user_regularization_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "my-class-images"
    folder.mkdir()
    for i, colour in enumerate([(20, 200, 20), (20, 20, 200)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"c{i}.png")
        (folder / f"c{i}.txt").write_text(f"a plain picture number {i}")
    return folder


def test_a_user_folder_marked_regularization_reaches_the_loss_with_its_weight(tmp_path, tiny_dev_dir):
    folder = user_regularization_folder(tmp_path)
    entries = [
        {"source": str(ROOT / "examples/data")},
        {"source": str(folder), "regularization": True, "loss_weight": 0.25, "repeats": 3},
    ]
    cfg = tiny_config(tmp_path, tiny_dev_dir, "--data.trigger_word=sks", f"--data.datasets={json.dumps(entries)}")
    dm = FluxDataModule.from_model_folder(
        cfg.data, tiny_dev_dir, flux_params(tiny_dev_dir).max_sequence_length, torch.float32
    )
    dm.prepare_data()
    dm.setup()
    weight_of = {}
    for batch in dm.train_dataloader():
        for caption, w in zip(batch["caption"], batch["weight"].tolist(), strict=True):
            weight_of.setdefault(caption, []).append(w)
    reg = {c: ws for c, ws in weight_of.items() if c.startswith("a plain picture")}
    assert sorted(reg) == ["a plain picture number 0", "a plain picture number 1"]  # no trigger word
    assert all(ws == [0.25] * 3 for ws in reg.values())  # 3 repeats, weight 0.25
    assert all(set(ws) == {1.0} for c, ws in weight_of.items() if c not in reg)


def _lora(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_resume_with_generated_regularization_equals_uninterrupted(tmp_path, tiny_dev_dir, monkeypatch):
    """2 steps + a resume to 4 == 4 straight, with generated images at loss weight 0.5 in the batches; the
    interrupted run's two fits reuse the images the straight run drew (one cache), loading no sampler."""
    args = ["--max_steps=4", "--train.checkpoint_every_n_steps=2", "--data.batch_size=3", *generated()]
    straight = tiny_config(tmp_path / "a", tiny_dev_dir, *args)
    fit(straight)
    interrupted = tiny_config(tmp_path / "b", tiny_dev_dir, *args)
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")
    no_sampler(monkeypatch)
    fit(replace(interrupted, train=replace(interrupted.train, max_steps=2)))
    trainer, _ = fit(interrupted)
    assert trainer.global_step == 4
    a, b = _lora(straight.output_path / "tiny.safetensors"), _lora(interrupted.output_path / "tiny.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("generate", "message"),
    [
        ({"prompts": []}, "data.datasets[1].generate: prompts must be a list of non-empty class prompts, got []"),
        ({"prompts": ["a circle"], "images_per_prompt": 0}, "images_per_prompt must be >= 1, got 0"),
        ({"prompts": ["a circle"], "size": 40}, "size must be a positive multiple of 16, got 40"),
    ],
)
def test_bad_generation_settings_are_one_line_before_any_model_loads(tmp_path, caplog, monkeypatch, generate, message):
    no_sampler(monkeypatch)
    entries = [{"source": str(ROOT / "examples/data")}, {"generate": generate}]
    argv = [
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        f"--output_dir={tmp_path / 'run'}",
        f"--model.source={tmp_path / 'no-model-yet'}",  # nothing written: it stops before tiny_if_missing
        f"--data.datasets={json.dumps(entries)}",
    ]
    assert train.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and len(errors[0].splitlines()) == 1
    assert not (tmp_path / "no-model-yet").exists()


def test_source_and_generate_together_is_an_error(tmp_path, tiny_dev_dir):
    entry = {"source": str(ROOT / "examples/data"), "generate": {"prompts": ["a circle"]}}
    with pytest.raises(ConfigError, match=r"data.datasets\[0\]: set source .* or generate, not both"):
        tiny_config(tmp_path, tiny_dev_dir, f"--data.datasets={json.dumps([entry])}")
