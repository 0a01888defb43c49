"""Data sources, scan errors, buckets, crops and the bucket batch sampler."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from flux_lora.config import DataConfig, DataError
from flux_lora.data.buckets import (
    SIDE_MULTIPLE,
    BucketBatchSampler,
    apply_crop,
    bucket_sizes,
    choose_bucket,
    cover_scale,
    image_crops,
)
from flux_lora.data.datamodule import collate
from flux_lora.data.scan import scan

from helpers.cache import write_image


def image_folder(root: Path, n: int = 3) -> Path:
    for i in range(n):
        write_image(root / f"img{i}.png", (64 + 16 * i, 64), (40 * i, 90, 200))
        (root / f"img{i}.txt").write_text(f"  caption {i}\n")
    return root


def cfg_for(source: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), resolution=64, cache_dir=str(tmp_path / "cache"), **kw)


# ------------------------------------------------------------------------------------------ sources


def test_folder_source_recursive_with_captions_and_hidden_folders_skipped(tmp_path):
    root = image_folder(tmp_path / "data")
    write_image(root / "sub" / "deep.jpg", (80, 48))
    (root / "sub" / "deep.txt").write_text("deep one")
    write_image(root / ".hidden" / "x.png", (64, 64))  # not data
    cfg = DataConfig(source=str(root), resolution=64, cache_dir=str(root / "cache"))
    write_image(root / "cache" / "y.png", (64, 64))  # the cache inside the data folder is not data either
    data = scan(cfg)
    by_name = {Path(r.name).name: r for r in data.records}
    assert sorted(by_name) == ["deep.jpg", "img0.png", "img1.png", "img2.png"]
    assert by_name["img1.png"].caption == "caption 1"  # stripped
    assert (by_name["deep.jpg"].width, by_name["deep.jpg"].height) == (80, 48)
    assert data.read_image(by_name["img2.png"]).size == (96, 64)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_metadata(tmp_path, fmt):
    root = tmp_path / "data"
    rows = [{"file_name": f"p{i}.png", "text": f"meta caption {i}"} for i in range(3)]
    for i, row in enumerate(rows):
        write_image(root / row["file_name"], (64, 48 + 16 * i))
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    data = scan(cfg_for(root, tmp_path))
    got = {Path(r.path).name: (r.caption, r.height) for r in data.records}
    assert got == {f"p{i}.png": (f"meta caption {i}", 48 + 16 * i) for i in range(3)}


def test_saved_dataset_with_custom_columns_embeds_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")
    pictures = [Image.new("RGB", (64 + 16 * i, 64), (10 * i, 100, 50)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"picture": pictures, "prompt": [f"row {i}" for i in range(3)]},
        features=datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    data = scan(cfg_for(tmp_path / "saved", tmp_path, image_column="picture", caption_column="prompt"))
    assert [r.caption for r in data.records] == ["row 0", "row 1", "row 2"]
    assert [r.row for r in data.records] == [0, 1, 2] and all(r.path is None for r in data.records)
    for r, pic in zip(data.records, pictures, strict=True):
        assert np.array_equal(np.asarray(data.read_image(r)), np.asarray(pic))


def test_missing_column_names_column_and_available(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"picture": [Image.new("RGB", (64, 64))], "prompt": ["x"]},
        features=datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"'caption'.*caption_column.*\['picture', 'prompt'\]"):
        scan(cfg_for(tmp_path / "saved", tmp_path, image_column="picture", caption_column="caption"))


def test_missing_caption_is_an_error_unless_a_default_is_set(tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "img1.txt").unlink()
    (root / "img2.txt").write_text("   \n")  # blank counts as missing
    with pytest.raises(DataError, match=r"2 image\(s\).*no caption.*img1\.png.*img2\.png.*default_caption"):
        scan(cfg_for(root, tmp_path))
    data = scan(cfg_for(root, tmp_path, default_caption="a photo"))
    assert [r.caption for r in data.records] == ["caption 0", "a photo", "a photo"]


def test_corrupt_images_skipped_with_warning_naming_them_and_a_count(tmp_path, caplog):
    root = image_folder(tmp_path / "data", n=2)
    (root / "garbage.png").write_bytes(b"not an image at all")
    (root / "garbage.txt").write_text("x")
    good = (root / "img0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "truncated.txt").write_text("x")
    for attempt in range(2):  # the second scan answers from the probe memo and must warn the same way
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flux_lora"):
            data = scan(cfg_for(root, tmp_path))
        assert len(data.records) == 2 and len(data.skipped) == 2, attempt
        text = caplog.text
        assert "garbage.png" in text and "truncated.png" in text
        assert "skipped 2 of 4 images" in text


def test_an_empty_or_unidentifiable_image_is_named_not_its_buffer(tmp_path, caplog):
    root = image_folder(tmp_path / "data", n=1)
    (root / "zero.jpg").write_bytes(b"")
    (root / "zero.txt").write_text("x")
    (root / "junk.jpg").write_bytes(b"JFIF? no")
    (root / "junk.txt").write_text("x")
    for attempt in range(2):  # fresh, then from the probe memo
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flux_lora"):
            scan(cfg_for(root, tmp_path))
        text = caplog.text
        assert "BytesIO" not in text, text
        assert "zero.jpg: the image cannot be read (the file is empty, 0 bytes)" in text, attempt
        assert (
            "junk.jpg: the image cannot be read (UnidentifiedImageError: cannot identify image file junk.jpg)" in text
        )


@pytest.mark.parametrize("setup", ["empty", "only_corrupt", "no_source"])
def test_empty_dataset_is_an_error(tmp_path, setup):
    root = tmp_path / "data"
    root.mkdir()
    if setup == "only_corrupt":
        (root / "bad.png").write_bytes(b"\x89PNG broken")
        (root / "bad.txt").write_text("x")
    source = "" if setup == "no_source" else root
    with pytest.raises(DataError, match="no usable image|data.source is empty"):
        scan(cfg_for(source, tmp_path) if source else DataConfig(source="", cache_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("resolution", 100, "data.resolution must be a positive multiple of 16, got 100"),
        ("crop", "left", "data.crop must be 'center' or 'random', got 'left'"),
        ("batch_size", 0, "data.batch_size must be >= 1, got 0"),
        ("caption_extension", "txt", "data.caption_extension"),
        ("bucket_step", 24, "data.bucket_step"),
    ],
)
def test_config_validation_names_field_and_value(field, value, match):
    with pytest.raises(DataError, match=match):
        DataConfig(**{field: value})


# ------------------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize("resolution", [64, 512, 1024])
def test_buckets_sides_multiple_of_16_area_close_aspect_limited(resolution):
    area = resolution**2
    sizes = bucket_sizes(resolution, max_aspect=4.0)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % SIDE_MULTIPLE == 0 and h % SIDE_MULTIPLE == 0
        # the height is the multiple of 16 nearest area / width, and width <= resolution: error <= 8 *
        # resolution
        assert abs(w * h - area) <= 8 * resolution, (w, h)
        assert max(w, h) <= 4 * min(w, h)
    assert len(set(sizes)) == len(sizes) and all((h, w) in sizes for w, h in sizes)


def test_known_picture_lands_in_its_bucket():
    """3:2 at 1024^2. Landscape candidates near 1.5 (by hand): 1264x832 (1.519), 1232x848 (1.453); 1264x832 is
    closer in log-aspect. Covering it scales 1536x1024 by 1264/1536 to 1264x843, a center crop removes 11
    rows."""
    buckets = bucket_sizes(1024)
    bucket = choose_bucket(1536, 1024, buckets, resolution=1024, max_aspect=4.0, upscale=False)
    assert bucket == (1264, 832)
    (p,) = image_crops(1536, 1024, bucket, crop="center", variants=1, flip=False, seed="s")
    assert p.resized == (1264, 843) and (p.left, p.top) == (0, 5)
    assert choose_bucket(3000, 3000, buckets, resolution=1024, max_aspect=4.0, upscale=False) == (1024, 1024)


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (257, 190), (640, 480), (90, 1000)])
def test_no_distortion_a_circle_stays_round(size):
    width, height = size
    image = Image.new("RGB", size, "white")
    r = min(width, height) // 3
    cx, cy = width // 2, height // 2
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill="black")
    bucket = choose_bucket(width, height, bucket_sizes(128), resolution=128, max_aspect=4.0, upscale=True)
    (p,) = image_crops(width, height, bucket, crop="center", variants=1, flip=False, seed="s")
    out = np.asarray(apply_crop(image, p).convert("L")) < 128
    assert out.shape == (bucket[1], bucket[0])
    ys, xs = np.nonzero(out)
    box_w, box_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert abs(box_w - box_h) <= 2, (box_w, box_h)  # same scale in x and y
    scale = cover_scale(width, height, bucket)
    assert abs(box_w - 2 * r * scale) <= 3


def test_no_upscaling_small_images_get_their_own_bucket():
    buckets = bucket_sizes(1024)
    for w, h in [(500, 400), (1100, 1000), (300, 900)]:
        bucket = choose_bucket(w, h, buckets, resolution=1024, max_aspect=4.0, upscale=False)
        assert bucket[0] <= w and bucket[1] <= h and cover_scale(w, h, bucket) <= 1.0
        assert bucket[0] % 16 == 0 and bucket[1] % 16 == 0
        assert abs(math.log(bucket[0] / bucket[1]) - math.log(w / h)) < 0.05
    assert choose_bucket(500, 400, buckets, resolution=1024, max_aspect=4.0, upscale=True) in buckets
    assert cover_scale(500, 400, choose_bucket(500, 400, buckets, resolution=1024, max_aspect=4.0, upscale=True)) > 1.0


def test_center_and_random_crops():
    bucket = (64, 64)
    (center,) = image_crops(128, 64, bucket, crop="center", variants=4, flip=False, seed="a")
    assert center.resized == (128, 64) and (center.left, center.top) == (32, 0)
    rand = image_crops(128, 64, bucket, crop="random", variants=4, flip=False, seed="a")
    assert 1 < len(rand) <= 4 and len({p.left for p in rand}) == len(rand)
    assert all(0 <= p.left <= 64 and p.top == 0 for p in rand)
    # reproducible from the seed
    assert rand == image_crops(128, 64, bucket, crop="random", variants=4, flip=False, seed="a")
    assert rand != image_crops(128, 64, bucket, crop="random", variants=4, flip=False, seed="b")
    # no slack: every random crop is the same, so one variant is cached
    assert len(image_crops(64, 64, bucket, crop="random", variants=4, flip=False, seed="a")) == 1


def test_flip_variant_is_the_mirror_image():
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).rectangle((0, 0, 20, 63), fill="red")
    plain, flipped = image_crops(96, 64, (64, 64), crop="center", variants=1, flip=True, seed="s")
    assert (plain.flip, flipped.flip) == (False, True)
    a, b = np.asarray(apply_crop(image, plain)), np.asarray(apply_crop(image, flipped))
    assert np.array_equal(a[:, ::-1], b) and not np.array_equal(a, b)


# ------------------------------------------------------------------------------------------ sampler


BUCKETS = [(64, 64)] * 5 + [(80, 48)] * 4 + [(48, 80)] * 2


def _sampler(**kw) -> BucketBatchSampler:
    args = dict(batch_size=2, repeats=1, seed=3)
    args.update(kw)
    return BucketBatchSampler(BUCKETS, [2] * len(BUCKETS), **args)


def test_batches_come_from_one_bucket_with_repeats_and_variants():
    sampler = _sampler(repeats=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len({BUCKETS[i] for i, _ in b}) == 1 for b in batches)
    assert max(len(b) for b in batches) == 2
    counts = Counter(i for b in batches for i, _ in b)
    assert counts == {i: 3 for i in range(len(BUCKETS))}
    assert {v for b in batches for _, v in b} == {0, 1}


def test_epochs_reshuffle_deterministically():
    sampler = _sampler()
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(_sampler(shuffle=False)) == list(_sampler(shuffle=False))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_samples_and_equal_batch_counts(drop_last):
    world = 2
    per_rank = [list(_sampler(rank=r, world_size=world, drop_last=drop_last)) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(_sampler(world_size=world, drop_last=drop_last))
    seen = [{i for b in batches for i, _ in b} for batches in per_rank]
    # 6 global batches (3 + 2 + 1 with partials) split 3 / 3: no padding, so the ranks share no sample
    if not drop_last:
        assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(len(BUCKETS)))
    else:  # the partial batch of the 5-image bucket is dropped: 4 full batches, 2 per rank
        assert all(len(b) == 2 for bs in per_rank for b in bs) and seen[0].isdisjoint(seen[1])


def test_padding_when_batches_do_not_divide_by_world_size():
    per_rank = [list(_sampler(batch_size=4, rank=r, world_size=2)) for r in range(2)]
    # global batches: 64x64 -> 4 + 1, 80x48 -> 4, 48x80 -> 2: 4 batches, even; with world 3 one is repeated
    per_rank3 = [list(_sampler(batch_size=4, rank=r, world_size=3)) for r in range(3)]
    assert len({len(b) for b in per_rank3}) == 1 and sum(map(len, per_rank3)) == 6
    assert sum(map(len, per_rank)) == 4


def test_collate_stacks_a_bucket_and_rejects_mixed_sizes():
    import torch

    def sample(h, w, c):
        return {"latents": torch.zeros(16, h, w), "txt": torch.zeros(8, 4), "y": torch.zeros(3), "caption": c}

    batch = collate([sample(8, 8, "a"), sample(8, 8, "b")])
    assert batch["latents"].shape == (2, 16, 8, 8) and batch["txt"].shape == (2, 8, 4)
    assert batch["caption"] == ["a", "b"]
    with pytest.raises(ValueError, match="mixes latent sizes"):
        collate([sample(8, 8, "a"), sample(6, 10, "b")])


def test_unshuffled_repeats_interleave():
    sampler = BucketBatchSampler([(64, 64)] * 2, [1, 1], batch_size=2, repeats=2, shuffle=False)
    assert [[i for i, _ in b] for b in sampler] == [[0, 1], [0, 1]]
