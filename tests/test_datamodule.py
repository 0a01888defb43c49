"""FluxDataModule under a real Lightning Trainer: cache filled first, then training reads only the cache."""

from __future__ import annotations

from collections import Counter

import lightning as L
import pytest
import torch
from torch import nn

from flux_lora.config import DataConfig
from flux_lora.data.cache import AutoEncoderSpec, TextEncoderSpec
from flux_lora.data.datamodule import FluxDataModule
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.text_encoders import TextEncoders

from helpers.cache import CAPTIONS, DTYPE, MAX_LENGTH, forbidden, write_data


class Recorder(L.LightningModule):
    """Consumes batches like a training step would (latents, txt, y) and records their captions per epoch."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 1)
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["caption"])
        assert batch["latents"].shape[0] == batch["txt"].shape[0] == batch["y"].shape[0]
        z = batch["latents"].mean(dim=(2, 3))
        return self.proj(z).mean() + batch["txt"].mean() * 0 + batch["y"].mean() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_reads_only_the_cache(tmp_path, tiny_dev_dir, monkeypatch):
    data_dir = write_data(tmp_path / "data")
    cfg = DataConfig(
        source=str(data_dir), resolution=64, cache_dir=str(tmp_path / "cache"), repeats=2, batch_size=2, flip=True
    )
    dm = FluxDataModule.from_model_folder(cfg, tiny_dev_dir, MAX_LENGTH, DTYPE, sample_prompts=["a cat"], device="cpu")
    dm.prepare_data()  # fills the cache with the real tiny encoders

    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran during training")

    for cls, name in [
        (TextEncoders, "encode"),
        (TextEncoders, "forward"),
        (AutoEncoder, "encode"),
        (AutoEncoder, "forward"),
    ]:
        monkeypatch.setattr(cls, name, boom)
    dm = FluxDataModule(
        cfg,
        TextEncoderSpec.from_folder(tiny_dev_dir, MAX_LENGTH, DTYPE),
        AutoEncoderSpec.from_folder(tiny_dev_dir, DTYPE),
        forbidden,
        forbidden,
        ["a cat"],
    )
    module = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)
    assert sorted(module.seen) == [0, 1]
    for epoch, captions in module.seen.items():
        assert Counter(captions) == {c: 2 for c in CAPTIONS}, epoch  # every image, `repeats` times
    assert module.seen[0] != module.seen[1]  # Lightning called set_epoch: a new order
    assert dm.sample_embeddings().txt.shape == (1, MAX_LENGTH, 32)


def test_dataloader_before_setup_is_an_error(tmp_path, tiny_dev_dir):
    cfg = DataConfig(source=str(tmp_path), resolution=64, cache_dir=str(tmp_path / "cache"))
    dm = FluxDataModule(
        cfg, TextEncoderSpec("x", MAX_LENGTH, "float32"), AutoEncoderSpec("y", "float32"), forbidden, forbidden
    )
    with pytest.raises(RuntimeError, match="prepare_data"):
        dm.train_dataloader()
