"""FLUX.1 Kontext training on image pairs: the paired folder, the reference cache entries, the loss on the target's
tokens, and the shipped config trained on the tiny Kontext model (a LoRA our reader, diffusers' Kontext pipeline
and kohya-style loaders take, resumed bit for bit)."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from flux_lora import sampling as S
from flux_lora.config import DataError, load_config
from flux_lora.data.cache import AutoEncoderSpec, TextEncoderSpec, plan_cache
from flux_lora.data.pairs import plan_references, scan_references
from flux_lora.data.scan import scan_all
from flux_lora.lora.files import read_lora
from flux_lora.model.flux import PRESETS
from flux_lora.toy.pairs import INSTRUCTION, write_pairs
from flux_lora.training.loss import StepDraws, dit_inputs
from flux_lora.training.module import FluxLoraModule
from flux_lora.training.run import build, last_checkpoint
from flux_lora.weights.tiny import write_tiny_model

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs/flux-kontext-dev_lora-r16_fp8.yaml"


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "kontext", variant="kontext", seed=2)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    return write_pairs(tmp_path_factory.mktemp("pairs"), 4, seed=7, size=32)


def _config(tmp_path: Path, model: Path, pairs: tuple[Path, Path], *overrides: str):
    return load_config(
        CONFIG,
        [
            f"--model.source={model}",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.source={pairs[0]}",
            f"--data.references={pairs[1]}",
            "--data.resolution=32",
            "--data.batch_size=2",
            "--lora.rank=4",
            "--lora.alpha=4",
            "--train.accelerator=cpu",
            "--train.devices=1",
            "--train.learning_rate=3e-3",
            "--train.warmup_steps=0",
            "--train.log_every_n_steps=2",
            "--model.gradient_checkpointing=false",
            *overrides,
        ],
    )


def _fit(cfg, *callbacks: L.Callback) -> tuple[L.Trainer, FluxLoraModule]:
    trainer, module, datamodule = build(cfg)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint(cfg))
    return trainer, module


def _stop_after(step: int) -> L.Callback:
    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step >= step:
                trainer.should_stop = True

    return Stop()


# ------------------------------------------------------------------------------------------ data


def test_pairs_are_matched_and_shared_references_cached_once(tmp_path, kontext_dir):
    targets, refs = write_pairs(tmp_path / "p", 3, seed=1, size=32)
    shutil.copy(refs / "00000.png", refs / "00001.png")  # two targets, one reference content
    (refs / "00002.png").rename(refs / "00002.jpg.png")  # not the same name: matched by name only
    cfg = _config(tmp_path, kontext_dir, (targets, refs)).data
    data = scan_all(cfg)
    with pytest.raises(DataError, match=r"^pair .*00002\.png: no reference of the same name in "):
        scan_references(cfg, data)
    (refs / "00002.jpg.png").rename(refs / "00002.jpg")  # another extension is fine (the bytes are PNG)
    references = scan_references(cfg, data)
    assert [Path(r.name).name for r in references.records] == ["00000.png", "00001.png", "00002.jpg"]
    ae = AutoEncoderSpec.from_folder(kontext_dir, torch.float32)
    plan = plan_cache(data, cfg, TextEncoderSpec.from_folder(kontext_dir, 32, torch.float32), ae)
    ref_plan = plan_references(plan, references, ae)
    keys = [jobs[0].key for jobs in ref_plan.variants]
    assert keys[0] == keys[1] != keys[2]  # the shared reference: one entry
    assert len({j.key for j in ref_plan.missing_latents}) == 2
    assert not set(keys) & {jobs[0].key for jobs in plan.variants}  # its own entries, not the targets'
    assert [jobs[0].placement for jobs in ref_plan.variants] == [jobs[0].placement for jobs in plan.variants]


def test_unreadable_reference_is_one_line_naming_the_pair(tmp_path, kontext_dir):
    targets, refs = write_pairs(tmp_path / "p", 2, seed=1, size=32)
    (refs / "00001.png").write_bytes(b"not an image")
    cfg = _config(tmp_path, kontext_dir, (targets, refs))
    with pytest.raises(DataError, match=r"^pair .*00001\.png: reference .*00001\.png is not a readable image") as e:
        build(cfg)  # before any model loads
    assert "\n" not in str(e.value)


def test_reference_tokens_follow_the_target_and_the_loss_takes_the_target_tokens():
    latents, reference = torch.randn(2, 16, 4, 6), torch.randn(2, 16, 6, 4)
    batch = {"latents": latents, "reference": reference, "txt": torch.randn(2, 5, 8), "y": torch.randn(2, 8)}
    noise = torch.randn(2, 6, 64)
    inputs, target = dit_inputs(batch, StepDraws(noise, torch.full((2,), 0.5), None), 1.0, torch.float32, None)
    img, ids = inputs["img"], inputs["img_ids"]
    assert img is not None and ids is not None
    assert img.shape == (2, 12, 64) and target.shape == (2, 6, 64)
    torch.testing.assert_close(img[:, 6:], S.pack(reference))  # clean, after the noisy tokens
    assert (ids[:, :6, 0] == 0).all() and (ids[:, 6:, 0] == 1).all()
    assert ids[0, 6:, 1:].tolist() == S.img_ids(1, 6, 4)[0, :, 1:].tolist()  # its own grid, from 0


# ------------------------------------------------------------------------------------------ training


def test_shipped_config_trains_on_pairs_writes_a_lora_others_read_and_resumes_exactly(
    tmp_path, kontext_dir, pairs, caplog
):
    args = ("--train.max_steps=6", "--train.checkpoint_every_n_steps=2", "--train.save_every_n_steps=0")
    straight = _config(tmp_path / "straight", kontext_dir, pairs, *args)
    seen: list[tuple[int, ...]] = []

    class Tokens(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((*batch["latents"].shape, *batch["reference"].shape))

    _fit(straight, Tokens())
    assert seen[0] == (2, 16, 4, 4, 2, 16, 4, 4)  # each target with its reference, fitted to its bucket
    lora = straight.output_path / "flux-kontext-lora.safetensors"
    state = load_file(lora)
    assert state and all(k.startswith("lora_unet_") for k in state)  # kohya-style keys
    dit_lora = read_lora(lora, PRESETS["tiny-kontext"])  # our reader
    assert any(float(w.up.abs().max()) > 0 for w in dit_lora.values())

    stopped = _config(tmp_path / "stopped", kontext_dir, pairs, *args)
    shutil.copytree(tmp_path / "straight" / "cache", tmp_path / "stopped" / "cache")
    trainer, _ = _fit(stopped, _stop_after(2))
    assert trainer.global_step == 2
    trainer, _ = _fit(stopped)
    assert trainer.global_step == 6
    resumed = load_file(stopped.output_path / "flux-kontext-lora.safetensors")
    assert resumed.keys() == state.keys()
    assert all(torch.equal(resumed[k], state[k]) for k in state)

    _diffusers_kontext_loads(lora, kontext_dir, tmp_path, caplog)


def _diffusers_kontext_loads(lora: Path, model: Path, tmp_path: Path, caplog) -> None:
    """diffusers' FluxKontextPipeline.load_lora_weights takes the LoRA (in the diffusers layout, as the tiny
    widths need) with no warning, and every key lands in the transformer."""
    diffusers = pytest.importorskip("diffusers")
    from flux_lora.lora.convert import main as convert
    from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config
    from flux_lora.weights.loading import load_flow_model
    from flux_lora.weights.safetensors_io import read_keys

    from helpers.parity import adapter_state, load_with_diffusers

    as_diffusers = tmp_path / "pytorch_lora_weights.safetensors"
    assert convert([str(lora), str(as_diffusers), "--to", "diffusers", "--model", str(model)]) in (0, None)
    ours = load_flow_model(model, dtype=torch.float32)
    transformer = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(ours.params))
    transformer.load_state_dict(flux_to_diffusers(ours.state_dict(), ours.params), strict=True)
    pipe = diffusers.FluxKontextPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    assert load_with_diffusers(pipe, as_diffusers, caplog) == []
    loaded = {k.replace(".default_0", "") for k in adapter_state(transformer)}
    assert {k.removeprefix("transformer.") for k in read_keys(as_diffusers)} == loaded


def test_toy_pairs_differ_only_in_colour(tmp_path):
    """The toy editing pairs: the scorer sees the reference's colour in the reference and pink in the target, and
    the same shape, position and size in both."""
    from PIL import Image

    from flux_lora.toy.pairs import edit_pair
    from flux_lora.toy.scorer import score_image

    targets, refs = write_pairs(tmp_path, 6, seed=3)
    for i in range(6):
        reference, target = edit_pair(3, i)
        seen_ref = score_image(Image.open(refs / f"{i:05d}.png")).labels
        seen_target = score_image(Image.open(targets / f"{i:05d}.png")).labels
        assert seen_ref == reference.labels and seen_target == target.labels
        assert target.colour == "pink" != reference.colour
        assert (targets / f"{i:05d}.txt").read_text().strip() == INSTRUCTION
    from flux_lora.toy.cli import main as toy

    assert toy(["pairs", str(tmp_path / "cli"), "--count", "6", "--seed", "3"]) == 0
    assert (tmp_path / "cli/references/00005.png").read_bytes() == (refs / "00005.png").read_bytes()


def test_metadata_jsonl_names_shared_references(tmp_path, kontext_dir):
    """An imagefolder of targets whose metadata.jsonl names each reference: two targets share one file."""
    import json

    targets, refs = write_pairs(tmp_path / "p", 3, seed=1, size=32)
    for caption in targets.glob("*.txt"):
        caption.unlink()
    (refs / "00000.png").rename(refs / "shared.png")
    rows = [
        {"file_name": "00000.png", "text": INSTRUCTION, "reference": "shared.png"},
        {"file_name": "00001.png", "text": INSTRUCTION, "reference": "shared.png"},
        {"file_name": "00002.png", "text": INSTRUCTION},  # by name
    ]
    (targets / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path, kontext_dir, (targets, refs)).data
    data = scan_all(cfg)
    references = scan_references(cfg, data)
    assert sorted(Path(r.name).name for r in references.records) == ["00002.png", "shared.png", "shared.png"]
    rows[1]["reference"] = "missing.png"
    (targets / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"^pair .*: its reference .*missing\.png \(metadata.jsonl\) does not exist"):
        scan_references(cfg, scan_all(cfg))


def test_the_loss_is_on_the_target_tokens_only(kontext_dir):
    """flow_matching_loss on a pair equals the MSE of the DiT's first N outputs (the target's tokens) against the
    velocity target, with caption dropout drawn as usual; the reference changes the loss through attention only."""
    from flux_lora.config import TrainConfig
    from flux_lora.model.text_encoders import TextEmbeddings
    from flux_lora.training.loss import draw, flow_matching_loss, weighted_mse
    from flux_lora.weights.loading import load_flow_model

    dit = load_flow_model(kontext_dir, dtype=torch.float32)
    p = dit.params
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(2, 16, 4, 6, generator=g),
        "reference": torch.randn(2, 16, 4, 6, generator=g),
        "txt": torch.randn(2, 5, p.context_in_dim, generator=g),
        "y": torch.randn(2, p.vec_in_dim, generator=g),
    }
    empty = TextEmbeddings(torch.zeros(1, 5, p.context_in_dim), torch.zeros(1, p.vec_in_dim))
    cfg = TrainConfig(caption_dropout=0.5)
    with torch.no_grad():
        loss = flow_matching_loss(dit, batch, cfg, torch.Generator().manual_seed(1), empty)
        draws = draw(batch["latents"].shape, cfg, torch.Generator().manual_seed(1))
        inputs, target = dit_inputs(batch, draws, cfg.guidance, torch.float32, empty)
        full = dit(**inputs)
        assert full.shape[1] == 2 * target.shape[1]
        expected = weighted_mse(full[:, :6], target, draws.t, cfg.loss_weighting)
        other = flow_matching_loss(
            dit, {**batch, "reference": -batch["reference"]}, cfg, torch.Generator().manual_seed(1), empty
        )
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert float((loss - other).abs()) > 1e-6
