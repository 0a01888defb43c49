"""FLUX.1 Kontext pairs with loss masks and output preservation (tiny Kontext model, float32): the masked loss
counts the target's tokens only, the mask weighting the target; the preserved output is computed with the
reference's tokens and compared on the target's; and a masked pair reaches the loss with its target's mask."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from flux_lora import sampling as S
from flux_lora.config import LoraConfig, TrainConfig, load_config
from flux_lora.lora.peft_adapters import adapters_disabled, inject_lora
from flux_lora.model.flux import Flux
from flux_lora.model.text_encoders import TextEmbeddings
from flux_lora.toy.pairs import write_pairs
from flux_lora.training.loss import OutputPreservation, draw, flow_matching_loss
from flux_lora.training.run import build
from flux_lora.weights.loading import load_flow_model
from flux_lora.weights.tiny import write_tiny_model

ROOT = Path(__file__).parents[1]
B, H, W, RH, RW = 2, 4, 6, 6, 4  # target latents 4x6 (6 tokens), reference 6x4 (6 tokens, another grid)


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "kontext", variant="kontext", seed=2)


@pytest.fixture(scope="module")
def adapted(kontext_dir) -> Flux:
    """The tiny Kontext DiT with LoRA adapters whose up matrices are random (the adapted model differs from the
    base)."""
    dit = load_flow_model(kontext_dir, dtype=torch.float32)
    inject_lora(dit, LoraConfig(rank=4, alpha=4))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return dit


def _batch(dit: Flux, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = dit.params
    return {
        "latents": torch.randn(B, 16, H, W, generator=g),
        "reference": torch.randn(B, 16, RH, RW, generator=g),
        "txt": torch.randn(B, 5, p.context_in_dim, generator=g),
        "y": torch.randn(B, p.vec_in_dim, generator=g),
    }


def _by_hand(dit: Flux, batch: dict[str, torch.Tensor], noise: torch.Tensor, t: torch.Tensor, txt, y) -> torch.Tensor:
    """The DiT's prediction for the target's tokens, its input assembled here: the noisy target's tokens, then
    the clean reference's with 1 in the first id channel on the reference's own grid."""
    x0 = S.pack(batch["latents"])
    img = torch.cat([(1 - t[:, None, None]) * x0 + t[:, None, None] * noise, S.pack(batch["reference"])], dim=1)
    ids = torch.cat([S.img_ids(B, H, W), S.img_ids(B, *batch["reference"].shape[-2:])], dim=1)
    ids[:, x0.shape[1] :, 0] = 1
    out = dit(
        img=img,
        img_ids=ids,
        txt=txt,
        txt_ids=torch.zeros(B, txt.shape[1], 3),
        timesteps=t,
        y=y,
        guidance=torch.full((B,), 1.0),
    )
    return out[:, : x0.shape[1]]


def test_masked_loss_on_a_pair_weights_the_target_tokens_only(adapted):
    batch = _batch(adapted)
    mask = torch.zeros(B, H, W)
    mask[0, :, :2] = 1.0  # sample 0: two latent columns (one token column); sample 1: a block of four pixels
    mask[1, 2:, 4:] = 0.5
    cfg = TrainConfig(guidance=1.0, loss_weighting="cosmap")
    with torch.no_grad():
        loss = flow_matching_loss(adapted, {**batch, "mask": mask}, cfg, torch.Generator().manual_seed(1))
        draws = draw(batch["latents"].shape, cfg, torch.Generator().manual_seed(1))
        pred = _by_hand(adapted, batch, draws.noise, draws.t, batch["txt"], batch["y"])
        unmasked = flow_matching_loss(adapted, batch, cfg, torch.Generator().manual_seed(1))
    # closed form on the latent grid: each sample's squared error, weighted by its mask over the target's pixels
    err = S.unpack((pred - (draws.noise - S.pack(batch["latents"]))) ** 2, H, W)  # [B, 16, H, W]
    per_sample = (err * mask[:, None]).sum(dim=(1, 2, 3)) / (16 * mask.sum(dim=(1, 2)))
    expected = (per_sample * S.loss_weight(draws.t, "cosmap")).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert float((loss - unmasked).abs()) > 1e-4  # the mask counts


def test_preservation_on_a_pair_keeps_the_reference_and_compares_the_target_tokens(adapted):
    batch = _batch(adapted, seed=1)
    g = torch.Generator().manual_seed(3)
    p = adapted.params
    prompts = TextEmbeddings(
        torch.randn(3, 5, p.context_in_dim, generator=g), torch.randn(3, p.vec_in_dim, generator=g)
    )
    pres = OutputPreservation(prompts, 0.7, lambda: adapters_disabled(adapted))
    cfg = TrainConfig(guidance=1.0)
    with torch.no_grad():
        loss = flow_matching_loss(adapted, batch, cfg, torch.Generator().manual_seed(1), preservation=pres)
        alone = flow_matching_loss(adapted, batch, cfg, torch.Generator().manual_seed(1))  # same noise and times
        draws = draw(batch["latents"].shape, cfg, torch.Generator().manual_seed(1), 3)
        assert draws.preserve is not None
        main = _by_hand(adapted, batch, draws.noise, draws.t, batch["txt"], batch["y"])
        txt, y = prompts.txt[draws.preserve], prompts.y[draws.preserve]
        with adapters_disabled(adapted):
            base = _by_hand(adapted, batch, draws.noise, draws.t, txt, y)
        kept = _by_hand(adapted, batch, draws.noise, draws.t, txt, y)
        target = draws.noise - S.pack(batch["latents"])
        term = ((kept - base) ** 2).mean()
        expected = ((main - target) ** 2).mean() + 0.7 * term
        # what a preservation pass without the reference's tokens would give
        no_ref = {**batch, "reference": batch["reference"][..., :0, :0]}
        with adapters_disabled(adapted):
            base_no_ref = _by_hand(adapted, no_ref, draws.noise, draws.t, txt, y)
        term_no_ref = ((_by_hand(adapted, no_ref, draws.noise, draws.t, txt, y) - base_no_ref) ** 2).mean()
        # ... and one comparing every token (the reference's outputs too)
        with adapters_disabled(adapted):
            base_all = _all_tokens(adapted, batch, draws, txt, y)
        term_all = ((_all_tokens(adapted, batch, draws, txt, y) - base_all) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close((loss - alone) / 0.7, term, rtol=1e-3, atol=0)  # the preservation term itself
    assert float(term) > 1e-4  # the adapters change the preserved prediction
    for wrong in (term_no_ref, term_all):  # each other reading is told apart by the tolerance above
        assert float((wrong - term).abs()) > 0.05 * float(term)


def _all_tokens(dit: Flux, batch, draws, txt, y) -> torch.Tensor:
    """The DiT's prediction for every token (the target's and the reference's), inputs as flow_matching_loss's."""
    from flux_lora.training.loss import dit_inputs, with_prompts

    inputs, _ = dit_inputs(batch, draws, 1.0, torch.float32, None)
    kept = with_prompts(inputs, TextEmbeddings(txt, y), torch.arange(B))
    return dit(**kept)


def _write_masks(targets: Path, folder: Path) -> Path:
    """A mask per target: its left half trained, its right half ignored."""
    folder.mkdir()
    for image in sorted(targets.glob("*.png")):
        w, h = Image.open(image).size
        mask = Image.new("L", (w, h), 0)
        mask.paste(255, (0, 0, w // 2, h))
        mask.save(folder / image.name)
    return folder


def test_a_masked_pair_reaches_the_loss_with_its_targets_mask(tmp_path, kontext_dir):
    pairs = write_pairs(tmp_path / "pairs", 2, seed=7, size=32)
    masks = _write_masks(pairs[0], tmp_path / "masks")
    cfg = load_config(
        ROOT / "configs/flux-kontext-dev_lora-r16_fp8.yaml",
        [
            f"--model.source={kontext_dir}",
            "--model.quantize=none",
            "--model.gradient_checkpointing=false",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.source={pairs[0]}",
            f"--data.references={pairs[1]}",
            f"--data.masks={masks}",
            "--data.resolution=32",
            "--data.batch_size=2",
            "--lora.rank=4",
            "--train.accelerator=cpu",
            "--train.max_steps=1",
            "--train.save_every_n_steps=0",
            "--train.checkpoint_every_n_steps=0",
        ],
    )
    seen: list[dict[str, torch.Tensor]] = []

    class Batches(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})

    trainer, module, datamodule = build(cfg)
    trainer.callbacks.append(Batches())
    trainer.fit(module, datamodule=datamodule)
    (batch,) = seen
    assert batch["mask"].shape == (2, *batch["latents"].shape[-2:])  # the target's grid
    half = batch["mask"].shape[-1] // 2
    assert (batch["mask"][..., :half] == 1).all() and (batch["mask"][..., half:] == 0).all()
    assert batch["reference"].shape == batch["latents"].shape
