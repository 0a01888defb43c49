"""The toy world: procedural scenes are deterministic, captioned and readable by the trainer's scan, and the
scorer reads shape, colour, position and size back from held-out, degraded scenes (>= 95 % per attribute)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_lora.config import DataConfig
from flux_lora.data.scan import scan
from flux_lora.toy.cli import main
from flux_lora.toy.scenes import (
    ALL_COLOURS,
    ALL_SHAPES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Labels,
    Scene,
    degrade,
    make_scene,
    make_scenes,
    parse_caption,
    render,
    write_dataset,
)
from flux_lora.toy.scorer import accuracy, score_image

HELD_OUT_SEED = 1234  # the datasets in these tests use seeds 0-3


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_scenes_are_deterministic_by_seed_and_index():
    assert make_scene(0, 7) == make_scene(0, 7)
    assert make_scenes(5, 0)[3] == make_scene(0, 3)  # the index-th scene does not depend on the count
    assert make_scenes(20, 0) != make_scenes(20, 1)
    scene = make_scene(2, 11)
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))


def test_the_default_set_covers_every_label_and_keeps_the_star_out():
    scenes = make_scenes(300, 0)
    assert {s.shape for s in scenes} == set(SHAPES) and "star" not in SHAPES
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.position for s in scenes} == set(POSITIONS)
    assert {s.size for s in scenes} == set(SIZES)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert "star" in {s.shape for s in make_scenes(50, 0, ALL_SHAPES)}


def test_captions_name_the_labels_and_parse_back():
    scene = Scene("circle", "red", "left", "small", "white")
    assert scene.caption == "a red circle on the left, small, on a white background"
    assert Scene("star", "orange", "centre", "large", "cream").caption.startswith("an orange star in the centre")
    for s in make_scenes(200, 0, ALL_SHAPES):
        assert parse_caption(s.caption) == s.labels
    assert parse_caption("sks, A Blue STAR, center.") == Labels("star", "blue", "centre", None)
    assert parse_caption("a photo of a dog") == Labels(None, None, None, None)


def test_dataset_is_reproducible_and_read_by_the_trainers_scan(tmp_path):
    a = write_dataset(tmp_path / "a", 12, seed=3)
    write_dataset(tmp_path / "b", 12, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(write_dataset(tmp_path / "c", 12, seed=4)[0].parent)
    assert len(a) == 12 and all(Image.open(p).size == (64, 64) for p in a)
    scanned = scan(DataConfig(source=str(tmp_path / "a"), resolution=64, cache_dir=str(tmp_path / "cache")))
    captions = {r.name: r.caption for r in scanned.records}
    assert len(captions) == 12
    assert captions[next(iter(captions))] == make_scene(3, 0).caption


@pytest.mark.parametrize(("count", "size"), [(0, 64), (3, 40)])
def test_bad_dataset_arguments_are_named(tmp_path, count, size):
    with pytest.raises(ValueError, match="count 0|size 40"):
        write_dataset(tmp_path, count, seed=0, size=size)
    with pytest.raises(ValueError, match="hexagon"):
        make_scene(0, 0, ["circle", "hexagon"])


def _held_out_accuracy(count: int, size: int, noise: float, blur: float) -> dict[str, float]:
    scenes = make_scenes(count, HELD_OUT_SEED, ALL_SHAPES, tuple(ALL_COLOURS))
    seen = [score_image(degrade(render(s, size), seed=i, noise=noise, blur=blur)).labels for i, s in enumerate(scenes)]
    return accuracy(zip(seen, [s.labels for s in scenes], strict=True))


def test_scorer_reads_held_out_degraded_scenes():
    """400 scenes of all four shapes and seven colours (the star and pink included) from an unseen seed,
    blurred (radius 0.8 px) and with Gaussian noise (std 8 of 255). Measured: 100 % on every attribute (the bound
    leaves room for other CPUs' rounding)."""
    result = _held_out_accuracy(400, 64, noise=8.0, blur=0.8)
    logging.getLogger(__name__).info("held-out scorer accuracy: %s", result)
    assert set(result) == {"shape", "colour", "position", "size"}
    assert all(v >= 0.95 for v in result.values()), result


def test_scorer_is_scale_free_and_copes_with_stronger_degradation():
    assert all(v >= 0.95 for v in _held_out_accuracy(40, 128, noise=8.0, blur=1.5).values())
    assert all(v >= 0.9 for v in _held_out_accuracy(120, 64, noise=15.0, blur=1.2).values())


def test_scorer_says_nothing_for_an_empty_image_and_follows_the_pixels():
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["cream"])
    assert score_image(degrade(blank, seed=0)).labels == Labels(None, None, None, None)
    scene = Scene("triangle", "green", "right", "large", "grey")
    assert score_image(render(scene)).labels == scene.labels
    moved = Scene("square", "purple", "left", "small", "white")
    assert score_image(render(moved)).labels == moved.labels


def test_accuracy_counts_only_named_attributes():
    seen = [Labels("circle", "red", "left", "small"), Labels("square", "red", "left", "small")]
    expected = [Labels("circle", "blue", None, None), Labels("circle", "red", None, None)]
    assert accuracy(zip(seen, expected, strict=True)) == {"shape": 0.5, "colour": 0.5}


def test_cli_writes_data_and_scores_it(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["data", str(tmp_path / "d"), "--count", "6", "--seed", "2", "--shapes", "star,circle"]) == 0
    assert len(list((tmp_path / "d").glob("*.png"))) == 6 == len(list((tmp_path / "d").glob("*.txt")))
    assert {make_scene(2, i, ["star", "circle"]).shape for i in range(6)} <= {"star", "circle"}
    caplog.clear()
    assert main(["score", str(tmp_path / "d")]) == 0
    assert "6 images, 6 with prompts; accuracy: shape 100 %, colour 100 %" in caplog.text
    # a wrong caption is reported as a miss
    (tmp_path / "d" / "scene_00000.txt").write_text("a blue hexagon on the left")
    seen = score_image(Image.open(tmp_path / "d" / "scene_00000.png")).labels
    caplog.clear()
    assert main(["score", str(tmp_path / "d" / "scene_00000.png")]) == 0
    assert ("caption says colour blue" in caplog.text) == (seen.colour != "blue")
    assert "1 images, 1 with prompts" in caplog.text


def test_cli_names_what_it_cannot_read(tmp_path, caplog):
    assert main(["score", str(tmp_path / "missing")]) == 1
    assert f"{tmp_path / 'missing'}: no such file or folder" in caplog.text
    (tmp_path / "note.png").write_text("not an image")
    assert main(["score", str(tmp_path / "note.png")]) == 1
    assert "note.png: not a readable image" in caplog.text
    with pytest.raises(SystemExit):
        main(["data", str(tmp_path / "x"), "--shapes", "hexagon"])


def test_the_unseen_colour_is_kept_out_unless_asked_for(tmp_path):
    assert all(s.colour != "pink" for s in make_scenes(200, 0))
    assert {s.colour for s in make_scenes(10, 0, colours=["pink"])} == {"pink"}
    assert parse_caption("a pink star on the left").colour == "pink"
    with pytest.raises(ValueError, match="teal"):
        make_scene(0, 0, colours=["teal"])


def test_score_reports_keep_previews_apart_beside_the_first_steps(tmp_path, caplog):
    """Trainer previews recorded as keep (sample.keep_prompts) get their own line per step, each attribute beside
    its step-0 figure: a LoRA that turns red into pink shows as keep colour 50 % (step 0: 100 %)."""
    from flux_lora.inference.outputs import png_info

    def preview(name: str, scene: Scene, prompt: str, step: int, keep: bool) -> None:
        settings = {"prompt": prompt, "step": step, "keep": keep, "seed": 0, "steps": 20, "width": 64, "height": 64}
        info = png_info({**settings, "model": "models/flux-toy"})
        render(scene).save(tmp_path / name, format="PNG", pnginfo=info)

    red, blue = Scene("circle", "red", "left", "large", "white"), Scene("square", "blue", "right", "large", "grey")
    pink = Scene("triangle", "pink", "centre", "large", "white")
    for step in (0, 300):
        preview(f"step{step}-0.png", pink if step else replace(pink, colour="red"), pink.caption, step, False)
        preview(f"step{step}-1.png", replace(red, colour="pink") if step else red, red.caption, step, True)
        preview(f"step{step}-2.png", blue, blue.caption, step, True)
    caplog.set_level(logging.INFO)
    assert main(["score", str(tmp_path)]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step")]
    assert lines == [
        "step 0: 1 images, 1 with prompts; accuracy: shape 100 %, colour 0 %, position 100 %, size 100 %",
        "step 0 keep: 2 images, 2 with prompts; keep accuracy: shape 100 %, colour 100 %, position 100 %, size 100 %",
        "step 300: 1 images, 1 with prompts; accuracy: shape 100 %, colour 100 %, position 100 %, size 100 %",
        "step 300 keep: 2 images, 2 with prompts; keep accuracy: shape 100 % (step 0: 100 %), colour 50 % "
        "(step 0: 100 %), position 100 % (step 0: 100 %), size 100 % (step 0: 100 %)",
    ]


def test_the_keep_set_covers_the_base_vocabulary_and_is_the_quick_starts():
    """54 scenes: every shape x colour x position the toy model knows, both sizes, no pink, no star; configs/toy.yaml
    previews exactly these, seed i for scene i."""
    from flux_lora.config import load_config
    from flux_lora.toy.scenes import keep_scenes

    scenes = keep_scenes()
    assert len(scenes) == 54 == len({(s.shape, s.colour, s.position) for s in scenes})
    assert {s.size for s in scenes} == set(SIZES) and {s.colour for s in scenes} == set(COLOURS)
    cfg = load_config(Path(__file__).parents[1] / "configs/toy.yaml", [])
    keep = [p for p in cfg.sample.resolved() if p.keep]
    assert [(p.prompt, p.seed) for p in keep] == [(s.caption, i) for i, s in enumerate(scenes)]
