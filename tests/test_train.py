"""The trainer end to end on the tiny model: what trains, what is saved, exact resume, no encoder in a step."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from flux_lora.config import load_config
from flux_lora.lora.files import read_lora
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.fp8 import FP8, FP8Linear
from flux_lora.model.text_encoders import TextEncoders
from flux_lora.training.run import run

from helpers.training import fit, tiny_config

ROOT = Path(__file__).parents[1]


def _live_encoders() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, (TextEncoders, AutoEncoder))]


class Probe(L.Callback):
    """Records what the tests check inside a real fit: gradients, dtypes, base weights, live encoders, losses."""

    def __init__(self, stop_at: int | None = None, count_encoders: bool = False):
        self.stop_at, self.losses, self.live_encoders, self.grad_names = stop_at, [], [], set()
        self.count_encoders = count_encoders  # a gc scan per step: slow, so only where it is the point
        # encoders alive before the run (the session's shared pipelines hold some): not the run's to free. Held
        # here, so no encoder the run makes can reuse one's id.
        self.earlier = {id(o): o for o in _live_encoders()} if count_encoders else {}

    def on_train_start(self, trainer, module):
        self.base_before = {k: v.clone() for k, v in module.dit.state_dict().items() if "lora_" not in k}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if not self.count_encoders:
            return
        self.live_encoders.append(sum(id(o) not in self.earlier for o in _live_encoders()))

    def on_after_backward(self, trainer, module):
        self.grad_names |= {n for n, p in module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def model_dir(tiny_dev_dir):
    return tiny_dev_dir


def test_fp8_training_trains_only_float32_adapters(tmp_path, model_dir, monkeypatch):
    calls = {"text": 0, "ae": 0}
    real_text, real_ae = TextEncoders.encode, AutoEncoder.encode

    def count_text(self, *a, **k):
        calls["text"] += 1
        return real_text(self, *a, **k)

    def count_ae(self, *a, **k):
        calls["ae"] += 1
        return real_ae(self, *a, **k)

    monkeypatch.setattr(TextEncoders, "encode", count_text)
    monkeypatch.setattr(AutoEncoder, "encode", count_ae)
    # bf16-mixed, as on a GPU: autocast must leave the fp8 weights fp8 (bf16-true would convert them)
    cfg = tiny_config(
        tmp_path,
        model_dir,
        "--quantize=float8_e4m3fn",
        "--max_steps=3",
        "--caption_dropout=0.5",
        "--train.precision=bf16-mixed",
    )
    probe = Probe(count_encoders=True)
    trainer, module = fit(cfg, probe)
    assert calls["text"] > 0 and calls["ae"] > 0  # the cache was filled by the real encoders...
    assert probe.live_encoders == [0, 0, 0]  # ...which no longer exist when a step runs

    dit = module.dit
    assert isinstance(dit.double_blocks[0].img_attn.qkv.base_layer, FP8Linear)
    lora_params = {n: p for n, p in dit.named_parameters() if "lora_" in n}
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params.values())
    assert probe.grad_names and all(".lora_" in n for n in probe.grad_names)
    after = {k: v for k, v in dit.state_dict().items() if "lora_" not in k}
    assert after.keys() == probe.base_before.keys()
    for k, v in after.items():
        assert v.dtype == probe.base_before[k].dtype, k
        assert torch.equal(v.view(torch.uint8), probe.base_before[k].view(torch.uint8)), k
    assert any(p.dtype == FP8 for p in after.values())

    # a second run with the same data encodes nothing
    calls.update(text=0, ae=0)
    fit(tiny_config(tmp_path, model_dir, "--max_steps=1", "--output_dir", str(tmp_path / "run2")))
    assert calls == {"text": 0, "ae": 0}


def test_outputs_of_a_run(tmp_path, model_dir):
    cfg = tiny_config(
        tmp_path,
        model_dir,
        "--max_steps=4",
        "--train.save_every_n_steps=2",
        "--train.checkpoint_every_n_steps=2",
        "--sample.prompts=[a red circle]",
        "--sample.steps=2",
    )
    lora_path = run(cfg)
    out = cfg.output_path
    assert lora_path == out / "tiny.safetensors" and lora_path.is_file()
    assert (out / "lora" / "tiny-step000002.safetensors").is_file()
    assert load_config(out / "config.yaml") == cfg
    # the step-0 baseline and the end, each PNG with its settings for other tools
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000000-0.png", "step000004-0.png"]
    info = Image.open(out / "samples" / "step000004-0.png").text
    settings = json.loads(info["flux_lora"])
    assert (settings["prompt"], settings["step"], settings["seed"], settings["lora"]) == ("a red circle", 4, 0, "tiny")
    assert info["parameters"].startswith("a red circle\nSteps: 2,")
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    with safe_open(str(lora_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_network_module"] == "networks.lora_flux" and "lora_adapter_metadata" not in meta
    lora = read_lora(lora_path, _params(model_dir))
    assert len(lora) == 2 * 10 + 2 * 3 and all(w.rank == 8 for w in lora.values())
    # checkpoints hold the adapters and the training state, not the frozen base
    # the two newest step checkpoints, no last.ckpt (resume picks the newest loadable one by step)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step000002.ckpt", "step000004.ckpt"]
    ckpt = torch.load(out / "checkpoints" / "step000004.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["global_step"] == 4 and "optimizer_states" in ckpt and "rng_states" in ckpt
    assert (out / "checkpoints" / "step000004.ckpt").stat().st_size < (
        model_dir / "flux1-dev.safetensors"
    ).stat().st_size


def _params(model_dir):
    from flux_lora.weights.loading import flux_params

    return flux_params(model_dir)


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("stop_at", [3, 4], ids=["mid-epoch", "epoch-end"])
def test_resume_equals_uninterrupted(tmp_path, model_dir, stop_at):
    """k steps, stop, resume to 8 == 8 straight: data order, crops, noise, dropout, optimizer and LR schedule.
    The 8 images make 4 batches an epoch, so 3 stops mid-epoch and 4 at an epoch's end."""
    args = [
        "--max_steps=8",
        f"--train.checkpoint_every_n_steps={stop_at}",
        "--lora.dropout=0.1",
        "--caption_dropout=0.3",
        "--data.crop=random",
        "--data.flip=true",
    ]
    straight = tiny_config(tmp_path / "a", model_dir, *args)
    fit(straight)
    interrupted = tiny_config(tmp_path / "b", model_dir, *args)
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")
    probe = Probe(stop_at=stop_at)
    trainer, _ = fit(interrupted, probe)
    assert trainer.global_step == stop_at and len(probe.losses) == stop_at
    resumed_trainer, _ = fit(interrupted)
    assert resumed_trainer.global_step == 8
    a = _lora_tensors(straight.output_path / "tiny.safetensors")
    b = _lora_tensors(interrupted.output_path / "tiny.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_up" in k)


@pytest.mark.parametrize("kind", ["lokr", "loha", "dora"])
def test_resume_equals_uninterrupted_for_each_adapter_kind(tmp_path, model_dir, kind):
    """lora.kind lokr / loha / dora on the fp8 base: 4 steps, stop, resume to 8 == 8 straight, bit for bit; the
    file holds the kind's LyCORIS keys and reads back."""
    args = ["--max_steps=8", "--train.checkpoint_every_n_steps=4", f"--lora.kind={kind}", "--lora.dropout=0.1"]
    args += ["--quantize=float8_e4m3fn", "--caption_dropout=0.3"]
    straight = tiny_config(tmp_path / "a", model_dir, *args)
    fit(straight)
    interrupted = tiny_config(tmp_path / "b", model_dir, *args)
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")
    trainer, _ = fit(interrupted, Probe(stop_at=4))
    assert trainer.global_step == 4
    ckpt = torch.load(interrupted.output_path / "checkpoints" / "step000004.ckpt", weights_only=True)
    suffix = {"lokr": ".lokr_", "loha": ".hada_", "dora": ".lora_magnitude_vector."}[kind]
    assert any(suffix in k for k in ckpt["state_dict"])  # the checkpoint holds the kind's adapters
    assert fit(interrupted)[0].global_step == 8
    a = _lora_tensors(straight.output_path / "tiny.safetensors")
    b = _lora_tensors(interrupted.output_path / "tiny.safetensors")
    assert a.keys() == b.keys() and any(suffix.replace("lora_magnitude_vector.", "dora_scale") in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_lora(straight.output_path / "tiny.safetensors", _params(model_dir))


def test_lora_learns_the_training_images(tmp_path, model_dir):
    """After training, sampling each training caption from fixed noise lands measurably closer to that image's
    latents with the LoRA than without it."""
    from flux_lora.data.cache import load_text_embeddings
    from flux_lora.data.datamodule import CachedDataset, FluxDataModule
    from flux_lora.inference.pipeline import FluxPipeline
    from flux_lora.lora.runtime import apply_loras
    from flux_lora.weights.loading import load_autoencoder, load_flow_model

    cfg = tiny_config(
        tmp_path,
        model_dir,
        "--max_steps=300",
        "--learning_rate=3e-3",
        "--caption_dropout=0",
        "--train.timestep_sampling=logit_normal",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
        "--model.gradient_checkpointing=false",
    )
    probe = Probe()
    trainer, module = fit(cfg, probe)
    assert sum(probe.losses[-20:]) < 0.8 * sum(probe.losses[:20])  # the loss falls

    dm = FluxDataModule.from_model_folder(cfg.data, model_dir, 32, torch.float32)
    dm.prepare_data()
    dm.setup("fit")
    dataset = CachedDataset.from_plan(dm.plan)
    model = load_flow_model(model_dir, dtype=torch.float32)
    pipe = FluxPipeline(model, load_autoencoder(model_dir, dtype=torch.float32), None, device="cpu")

    def distance() -> float:
        total = 0.0
        for i in range(len(dataset)):
            target = dataset[i]["latents"].float()
            emb = load_text_embeddings(dm.plan, [dataset.captions[i]])
            out = pipe(
                text_embeddings=emb,
                height=8 * target.shape[1],
                width=8 * target.shape[2],
                seed=i,
                num_inference_steps=8,
                guidance=1.0,
                output_type="latent",
                progress=False,
            )
            total += float((out[0] - target).square().mean())
        return total / len(dataset)

    base = distance()
    apply_loras(model, [(read_lora(cfg.output_path / "tiny.safetensors", model.params), 1.0, "trained")])
    trained = distance()
    assert trained < 0.75 * base, (trained, base)  # measured: 0.71 vs 1.31 (0.55x)
