"""The content-keyed cache: what is encoded when, resume, concurrency, values, and releasing the encoders."""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import weakref
from pathlib import Path

import pytest
import torch

from flux_lora.config import DataConfig, DataError
from flux_lora.data.buckets import apply_crop
from flux_lora.data.cache import (
    AutoEncoderSpec,
    TextEncoderSpec,
    fill_cache,
    image_to_tensor,
    load_text_embeddings,
    plan_cache,
)
from flux_lora.data.datamodule import FluxDataModule, make_dataloader
from flux_lora.data.fingerprint import fingerprint_file, fingerprint_module, fingerprint_paths
from flux_lora.data.scan import scan
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.text_encoders import TextEncoders
from flux_lora.weights.loading import load_autoencoder
from flux_lora.weights.tiny import write_tiny_model

from helpers.cache import (
    DTYPE,
    MAX_LENGTH,
    Loaders,
    fill_worker,
    forbidden,
    setup_run,
    write_data,
)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return write_data(tmp_path / "data")


def test_first_run_encodes_all_second_run_nothing(tmp_path, data_dir, tiny_dev_dir):
    cfg, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", flip=True)
    assert len(plan.missing_text) == 5  # 3 captions + "" + 1 sample prompt
    assert len(plan.missing_latents) == 6  # 3 images x (plain + flipped)
    loaders = Loaders(tiny_dev_dir)
    stats = fill_cache(plan, data, loaders.text, loaders.ae, batch_size=2, progress=False)
    assert (stats.texts, stats.latents) == (5, 6)
    assert loaders.loads == {"text": 1, "ae": 1} and loaders.encoded == {"text": 5, "ae": 6}

    _, data2, plan2 = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", flip=True)
    assert plan2.complete
    assert fill_cache(plan2, data2, forbidden, forbidden, progress=False).texts == 0
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_changed_caption_reencodes_only_that_caption(tmp_path, data_dir, tiny_dev_dir):
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False)
    (data_dir / "img1.txt").write_text("a blue square, edited")
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    assert plan.missing_text == ["a blue square, edited"] and not plan.missing_latents
    loaders = Loaders(tiny_dev_dir)
    fill_cache(plan, data, loaders.text, forbidden, progress=False)
    assert loaders.encoded == {"text": 1} and loaders.loads == {"text": 1}


def test_changed_image_reencodes_only_its_latents(tmp_path, data_dir, tiny_dev_dir):
    from PIL import Image

    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", crop="random", crop_variants=3)
    fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False)
    Image.new("RGB", (96, 64), (1, 2, 3)).save(data_dir / "img1.png")
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", crop="random", crop_variants=3)
    assert not plan.missing_text
    assert {j.record for j in plan.missing_latents} == {1}
    assert len(plan.missing_latents) == len(plan.variants[1]) > 1  # every random-crop variant of that image
    loaders = Loaders(tiny_dev_dir)
    fill_cache(plan, data, forbidden, loaders.ae, progress=False)
    assert loaders.encoded == {"ae": len(plan.variants[1])}


def test_changed_encoder_misses_everything(tmp_path, data_dir, tiny_dev_dir):
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False)
    other = write_tiny_model(tmp_path / "other", seed=7)
    _, _, plan2 = setup_run(data_dir, other, tmp_path / "cache")
    assert len(plan2.missing_text) == len(plan2.text_keys) and len(plan2.missing_latents) == 3
    # a different max length or dtype is another identity too
    spec = TextEncoderSpec.from_folder(tiny_dev_dir, MAX_LENGTH, DTYPE)
    assert spec.key("x") != TextEncoderSpec.from_folder(tiny_dev_dir, 16, DTYPE).key("x")
    assert spec.key("x") != TextEncoderSpec.from_folder(tiny_dev_dir, MAX_LENGTH, torch.bfloat16).key("x")


def test_interrupted_pass_resumes_with_the_rest(tmp_path, data_dir, tiny_dev_dir):
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    total_text = len(plan.missing_text)
    failing = Loaders(tiny_dev_dir, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        fill_cache(plan, data, failing.text, failing.ae, batch_size=1, progress=False)
    assert failing.encoded == {"text": 2}
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    assert len(plan.missing_text) == total_text - 2 and len(plan.missing_latents) == 3
    loaders = Loaders(tiny_dev_dir)
    fill_cache(plan, data, loaders.text, loaders.ae, batch_size=1, progress=False)
    assert loaders.encoded == {"text": total_text - 2, "ae": 3}
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cached_values_equal_a_fresh_encode(tmp_path, data_dir, tiny_dev_dir):
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", flip=True)
    fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, batch_size=3, progress=False)
    te = TextEncoders.from_folder(tiny_dev_dir, MAX_LENGTH, dtype=DTYPE)
    prompts = list(plan.text_keys)
    cached = load_text_embeddings(plan, prompts)
    for i, prompt in enumerate(prompts):  # one at a time: batching must not change the values
        fresh = te.encode([prompt])
        torch.testing.assert_close(cached.txt[i], fresh.txt[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.y[i], fresh.y[0], atol=1e-5, rtol=1e-5)
    assert cached.txt.dtype == DTYPE and cached.txt.shape[1] == MAX_LENGTH
    ae = load_autoencoder(tiny_dev_dir, dtype=DTYPE)
    for job in (j for jobs in plan.variants for j in jobs):
        image = data.read_image(data.records[job.record])
        fresh = ae.encode(image_to_tensor(apply_crop(image, job.placement))[None])[0]
        cached_latent = plan.store.read_latent(job.key)
        w, h = job.placement.bucket
        assert cached_latent.shape == (16, h // 8, w // 8)
        torch.testing.assert_close(cached_latent, fresh, atol=1e-5, rtol=1e-5)


def test_fill_releases_the_encoders(tmp_path, data_dir, tiny_dev_dir):
    refs = []

    def load_text():
        te = TextEncoders.from_folder(tiny_dev_dir, MAX_LENGTH, dtype=DTYPE)
        refs.extend([weakref.ref(te), weakref.ref(te.t5), weakref.ref(te.clip)])
        return te

    def load_ae():
        ae = load_autoencoder(tiny_dev_dir, dtype=DTYPE)
        refs.append(weakref.ref(ae))
        return ae

    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    stats = fill_cache(plan, data, load_text, load_ae, progress=False)
    gc.collect()
    assert len(refs) == 4 and all(r() is None for r in refs)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(stats).values())


def test_training_batches_touch_no_encoder(tmp_path, data_dir, tiny_dev_dir, monkeypatch):
    cfg, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", batch_size=2, flip=True)
    fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False)

    def boom(*a, **k):
        raise AssertionError("an encoder ran during training")

    for cls, name in [
        (TextEncoders, "encode"),
        (TextEncoders, "forward"),
        (AutoEncoder, "encode"),
        (AutoEncoder, "forward"),
        (TextEncoders, "from_folder"),
    ]:
        monkeypatch.setattr(cls, name, boom)
    monkeypatch.setattr("flux_lora.weights.loading.load_autoencoder", boom)
    batches = list(make_dataloader(plan.refresh(), cfg))
    assert sum(len(b["caption"]) for b in batches) == 3
    for b in batches:
        assert b["latents"].shape[:2] == (len(b["caption"]), 16) and b["txt"].shape[1:] == (MAX_LENGTH, 32)


def test_concurrent_fill_from_two_processes(tmp_path, data_dir, tiny_dev_dir):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(data_dir), str(tiny_dev_dir), str(tmp_path / "cache"), barrier, results)
    procs = [ctx.Process(target=fill_worker, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    encoded = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # one process encoded everything, the other waited on the lock and found the cache complete
    assert sorted(sum(e.values()) for e in encoded) == [0, 5 + 6]
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", flip=True)
    assert plan.complete
    assert len(load_text_embeddings(plan, list(plan.text_keys))) == 5


def test_empty_and_sample_prompts_always_cached(tmp_path, data_dir, tiny_dev_dir):
    cfg = DataConfig(source=str(data_dir), resolution=64, cache_dir=str(tmp_path / "cache"))
    dm = FluxDataModule.from_model_folder(
        cfg, tiny_dev_dir, MAX_LENGTH, DTYPE, sample_prompts=["a cat", "a dog"], device="cpu"
    )
    dm.prepare_data()
    dm.setup("fit")
    empty, samples = dm.empty_embedding(), dm.sample_embeddings()
    assert empty.txt.shape == (1, MAX_LENGTH, 32) and samples.y.shape[0] == 2
    te = TextEncoders.from_folder(tiny_dev_dir, MAX_LENGTH, dtype=DTYPE)
    torch.testing.assert_close(empty.txt, te.encode([""]).txt, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="sample_prompts"):
        load_text_embeddings(dm.plan, ["never planned"])


@pytest.mark.parametrize("problem", ["missing_caption", "empty", "missing_column"])
def test_data_errors_come_before_any_encoder_load(tmp_path, data_dir, tiny_dev_dir, problem):
    if problem == "missing_caption":
        (data_dir / "img0.txt").unlink()
    elif problem == "empty":
        data_dir = tmp_path / "nothing"
        data_dir.mkdir()
    else:
        (data_dir / "metadata.jsonl").write_text('{"file_name": "img0.png", "words": "x"}\n')
    cfg = DataConfig(source=str(data_dir), resolution=64, cache_dir=str(tmp_path / "cache"))
    spec_t = TextEncoderSpec.from_folder(tiny_dev_dir, MAX_LENGTH, DTYPE)
    spec_a = AutoEncoderSpec.from_folder(tiny_dev_dir, DTYPE)
    dm = FluxDataModule(cfg, spec_t, spec_a, forbidden, forbidden)
    with pytest.raises(DataError):
        dm.prepare_data()


def test_loader_dtype_must_match_the_spec(tmp_path, data_dir, tiny_dev_dir):
    cfg = DataConfig(source=str(data_dir), resolution=64, cache_dir=str(tmp_path / "cache"))
    data = scan(cfg)
    plan = plan_cache(
        data,
        cfg,
        TextEncoderSpec.from_folder(tiny_dev_dir, MAX_LENGTH, torch.bfloat16),
        AutoEncoderSpec.from_folder(tiny_dev_dir, DTYPE),
    )
    with pytest.raises(ValueError, match="computes in float32 but the cache plan expects bfloat16"):
        fill_cache(plan, data, Loaders(tiny_dev_dir).text, forbidden, progress=False)


# ------------------------------------------------------------------------------------------ fingerprints


def test_file_fingerprint_samples_large_safetensors(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import flux_lora.data.fingerprint as fp

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(200_000, dtype=torch.float32)}, str(path))
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 1024)  # force the sampled path
    before = fingerprint_file(path)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1  # the last chunk is always sampled
    path.write_bytes(bytes(raw))
    assert fingerprint_file(path) != before
    assert fingerprint_file(path) == fingerprint_file(path)


def test_folder_fingerprint_ignores_readme_and_module_fingerprint_sees_weights(tmp_path, tiny_dev_dir):
    folder = tmp_path / "te"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("one")
    before = fingerprint_paths([folder])
    (folder / "README.md").write_text("two")
    assert fingerprint_paths([folder]) == before
    (folder / "config.json").write_text('{"a": 1}')
    assert fingerprint_paths([folder]) != before
    ae = load_autoencoder(tiny_dev_dir, dtype=DTYPE)
    first = fingerprint_module(ae)
    with torch.no_grad():
        ae.encoder.conv_in.bias[0] += 1e-3
    assert fingerprint_module(ae) != first


def test_release_frees_weights_even_if_a_reference_survives(tmp_path, data_dir, tiny_dev_dir):
    kept = []  # a careless caller holding on to what its loader returned

    def load_text():
        kept.append(TextEncoders.from_folder(tiny_dev_dir, MAX_LENGTH, dtype=DTYPE))
        return kept[-1]

    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    fill_cache(plan, data, load_text, Loaders(tiny_dev_dir).ae, progress=False)
    assert {p.device.type for p in kept[0].parameters()} == {"meta"}


def test_captions_longer_than_t5s_limit_are_named_once(tmp_path, data_dir, tiny_dev_dir, caplog):
    """A caption cut at T5's max_length is one warning naming its files (not one per caption, not silent)."""
    long = " ".join(["a very long caption about a red circle"] * 12)
    (data_dir / "img0.txt").write_text(long)
    (data_dir / "img2.txt").write_text(long + " again")
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="flux_lora"):
        fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False)
    cut = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert len(cut) == 1, cut
    assert f"2 captions are longer than T5's {MAX_LENGTH} tokens" in cut[0]
    assert "img0.png" in cut[0] and "img2.png" in cut[0] and "img1.png" not in cut[0], cut[0]
