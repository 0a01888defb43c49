"""The dataset conventions users bring: trigger words, kohya ``N_name`` folders, several datasets with their own
resolution lists in one run, every (image, resolution) pair cached once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from flux_lora.config import DataConfig, DataError, DatasetConfig, load_config, save_config
from flux_lora.config_io import ConfigError
from flux_lora.data.cache import AutoEncoderSpec, CacheStore, TextEncoderSpec
from flux_lora.data.datamodule import FluxDataModule
from flux_lora.data.scan import apply_trigger, scan, scan_all
from flux_lora.training.run import run

from helpers.cache import DTYPE, MAX_LENGTH, Loaders, forbidden

ROOT = Path(__file__).parents[1]


def image(path: Path, size=(64, 64), color=(200, 30, 30), caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def kohya_folder(root: Path) -> Path:
    """kohya's DreamBooth layout: 2 instance images without captions, 3 captioned class images (one nested)."""
    image(root / "10_sks dog" / "a.png", color=(10, 20, 30))
    image(root / "10_sks dog" / "b.png", (96, 64), color=(40, 50, 60))
    for i, sub in enumerate(["2_dog/x.png", "2_dog/y.png", "2_dog/more/z.png"]):
        image(root / sub, color=(100 + 40 * i, 90, 80), caption=f"a dog {i}")
    return root


def test_apply_trigger():
    assert apply_trigger("a photo of [trigger] on a beach", "sks", "x") == "a photo of sks on a beach"
    assert apply_trigger("a photo on a beach", "sks", "x") == "sks, a photo on a beach"
    assert apply_trigger("sks dog on a beach", "sks", "x") == "sks dog on a beach"  # already there: not twice
    assert apply_trigger("", "sks", "x") == "sks"
    assert apply_trigger("a photo", None, "x") == "a photo"
    with pytest.raises(DataError, match=r"^the caption of img.png uses \[trigger\] but data.trigger_word is not set"):
        apply_trigger("[trigger] on a beach", None, "the caption of img.png")


def test_kohya_folders_repeat_and_caption(tmp_path):
    root = kohya_folder(tmp_path / "data")
    data = scan(DataConfig(source=str(root), repeats=3, cache_dir=str(tmp_path / "cache")))
    by_name = {Path(r.name).relative_to(root).as_posix(): r for r in data.records}
    assert {n: (r.caption, r.repeats) for n, r in by_name.items()} == {
        "10_sks dog/a.png": ("sks dog", 30),
        "10_sks dog/b.png": ("sks dog", 30),
        "2_dog/x.png": ("a dog 0", 6),
        "2_dog/y.png": ("a dog 1", 6),
        "2_dog/more/z.png": ("a dog 2", 6),
    }


def test_kohya_repeats_counted_in_the_data_module(tmp_path, tiny_dev_dir):
    root = kohya_folder(tmp_path / "data")
    cfg = DataConfig(source=str(root), resolution=64, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm = FluxDataModule.from_model_folder(cfg, tiny_dev_dir, MAX_LENGTH, DTYPE, device="cpu")
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = Counter(c for batch in loader for c in batch["caption"])
    assert seen == {"sks dog": 2 * 10, "a dog 0": 2, "a dog 1": 2, "a dog 2": 2}
    assert len(loader) == sum(1 for _ in loader)


def two_datasets(tmp_path: Path) -> DataConfig:
    """The same three images in two datasets: one at [32, 64] with trigger 'sks', one at 64 with 'zxq'."""
    root = tmp_path / "data"
    image(root / "a.png", caption="a red square")
    image(root / "b.png", (96, 64), (30, 200, 30), caption="a photo of [trigger] in green")
    image(root / "c.png", (64, 96), (30, 30, 200), caption="a blue thing")
    return DataConfig(
        datasets=[
            DatasetConfig(source=str(root), resolution=[32, 64], trigger_word="sks", repeats=2),
            DatasetConfig(source=str(root), resolution=64),
        ],
        trigger_word="zxq",
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )


def test_several_datasets_with_their_own_resolution_lists(tmp_path, tiny_dev_dir):
    cfg = two_datasets(tmp_path)
    data = scan_all(cfg)
    assert [(r.part, r.caption, r.repeats) for r in data.records] == [
        (0, "sks, a red square", 2),
        (0, "a photo of sks in green", 2),
        (0, "sks, a blue thing", 2),
        (1, "zxq, a red square", 1),
        (1, "a photo of zxq in green", 1),
        (1, "zxq, a blue thing", 1),
    ]
    loaders = Loaders(tiny_dev_dir)
    dm = FluxDataModule(
        cfg,
        TextEncoderSpec.from_folder(tiny_dev_dir, MAX_LENGTH, DTYPE),
        AutoEncoderSpec.from_folder(tiny_dev_dir, DTYPE),
        loaders.text,
        loaders.ae,
        device="cpu",
    )
    dm.prepare_data()
    dm.setup("fit")
    plan = dm.plan
    # 3 images x 2 resolutions in dataset 0, the same 3 at 64 again in dataset 1: 9 samples, 6 latents encoded
    assert len(plan.buckets) == 9 and loaders.encoded["ae"] == 6
    assert Counter(plan.records) == {0: 2, 1: 2, 2: 2, 3: 1, 4: 1, 5: 1}
    keys = [{j.key for j in jobs} for jobs in plan.variants]
    first = set().union(*(k for k, r in zip(keys, plan.records, strict=True) if r < 3))
    second = set().union(*(k for k, r in zip(keys, plan.records, strict=True) if r >= 3))
    assert len(first) == 6 and second < first  # dataset 1's (image, 64) pairs are dataset 0's, cached once
    small = [b for b, r, k in zip(plan.buckets, plan.records, keys, strict=True) if r < 3 and not k & second]
    assert small and all(w * h <= 32 * 32 for w, h in small)
    assert all(w * h <= 64 * 64 for w, h in plan.buckets)  # never upscaled
    batches = list(dm.train_dataloader())
    assert all(len({tuple(t.shape) for t in b["latents"]}) == 1 for b in batches)  # one bucket per batch
    seen = Counter(c for b in batches for c in b["caption"])
    assert seen["sks, a red square"] == 2 * 2 and seen["zxq, a red square"] == 1
    # a second run finds every (image, resolution) pair cached and loads no encoder
    again = FluxDataModule(cfg, dm.text_spec, dm.ae_spec, forbidden, forbidden, device="cpu")
    again.prepare_data()


def test_trigger_word_in_captions_prompts_and_lora_metadata(tmp_path, tiny_dev_dir):
    root = kohya_folder(tmp_path / "data")
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [
            f"--model.source={tiny_dev_dir}",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.datasets",
            json.dumps([{"source": str(root), "resolution": [32, 64]}, {"source": str(root / "2_dog")}]),
            "--data.trigger_word=sks",
            "--data.resolution=32",
            "--sample.prompts=a photo of [trigger], at night",
            "--sample.prompts=a cat",
            "--sample.every_n_steps=0",
            "--train.max_steps=2",
            "--train.accelerator=cpu",
            "--train.devices=1",
        ],
    )
    assert cfg.sample.prompts == ["a photo of [trigger], at night", "a cat"]
    lora = run(cfg)
    cached = {}
    for path in (tmp_path / "cache" / "text").rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            cached[f.metadata()["caption"]] = path
    assert {"sks dog", "sks, a dog 0", "a photo of sks, at night", "sks, a cat"} <= set(cached)
    assert not any("[trigger]" in c for c in cached)
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "sks"
    freq = json.loads(meta["ss_tag_frequency"])
    assert freq[str(root)]["sks dog"] == 2 and freq[str(root / "2_dog")]["sks"] == 3
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_num_train_images"] == str(2 * 10 + 3 * 2 + 3 * 1)
    assert CacheStore(tmp_path / "cache").root.is_dir()


def test_dataset_entries_take_the_data_sections_values(tmp_path):
    entries = "[{source: a, repeats: 3}, {source: b, resolution: [512, 768], trigger_word: ohwx}]"
    cfg = load_config(overrides=["--data.datasets", entries, "--resolution", "256", "--caption_extension", ".caption"])
    a, b = cfg.data.dataset_configs()
    assert (a.source, a.repeats, a.resolutions, a.caption_extension, a.trigger_word) == (
        "a",
        3,
        [256],
        ".caption",
        None,
    )
    assert (b.repeats, b.resolutions, b.trigger_word) == (1, [512, 768], "ohwx")
    assert cfg.data.all_resolutions == [256, 512, 768]
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    with pytest.raises(ConfigError, match=r"data.datasets\[1\]: data.resolution must be a positive multiple of 16"):
        load_config(overrides=["--data.datasets", "[{source: a}, {source: b, resolution: 100}]"])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].source is empty"):
        load_config(overrides=["--data.datasets", "[{repeats: 2}]"])


def test_tag_frequency_is_ordered_by_count_then_tag(tmp_path):
    """``ss_tag_frequency`` orders tags by count, then by name, so a stopped and resumed run (another process,
    another string hash seed) writes the same metadata as a straight run: it came out in set order before, which
    follows the hash seed (seen: alpha/mid swapped between two processes)."""
    from flux_lora.training.callbacks import dataset_metadata

    for i, caption in enumerate(["zeta, alpha, mid", "mid, beta", "omega, alpha"]):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption)
    data = scan(DataConfig(source=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    frequency = json.loads(dataset_metadata(data, ["d"])["ss_tag_frequency"])
    assert list(frequency["d"].items()) == [("alpha", 2), ("mid", 2), ("beta", 1), ("omega", 1), ("zeta", 1)]
