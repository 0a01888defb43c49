"""Masked loss: masks from the alpha channel or a mask folder, on the latent grid, cached with the latents (part
of the key), weighting the loss per latent pixel."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flux_lora import sampling as S
from flux_lora.config import DataConfig, DataError, TrainConfig
from flux_lora.data.cache import fill_cache
from flux_lora.data.datamodule import CachedDataset, collate
from flux_lora.model.flux import PRESETS
from flux_lora.training.loss import flow_matching_loss

from helpers.cache import Loaders, setup_run
from helpers.dit import lora_dit

H, W = 8, 8  # latent grid


def _pred_grad(mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss gradient w.r.t. the DiT's prediction (unpacked to ``[B, C, H, W]``) and the adapters' grads."""
    dit = lora_dit(PRESETS["tiny"], rank=2, quantize=False, random_b=True)
    p, g = dit.params, torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(2, p.in_channels // 4, H, W, generator=g),
        "txt": torch.randn(2, 5, p.context_in_dim, generator=g),
        "y": torch.randn(2, p.vec_in_dim, generator=g),
    }
    if mask is not None:
        batch["mask"] = mask
    grads = []

    def keep_grad(module, args, out) -> None:  # returns None: the output is left as it is
        out.register_hook(grads.append)

    dit.register_forward_hook(keep_grad)
    flow_matching_loss(dit, batch, TrainConfig(), torch.Generator().manual_seed(1)).backward()
    adapters = [q.grad for q in dit.parameters() if q.requires_grad]
    return S.unpack(grads[0], H, W), adapters


def test_zero_mask_over_half_the_image_zeroes_that_halfs_gradient():
    mask = torch.ones(2, H, W)
    mask[:, :, : W // 2] = 0  # the left half is ignored
    grad, adapters = _pred_grad(mask)
    assert torch.count_nonzero(grad[..., : W // 2]) == 0
    assert torch.count_nonzero(grad[..., W // 2 :]) == grad[..., W // 2 :].numel()
    assert all(a is not None and torch.count_nonzero(a) > 0 for a in adapters)
    unmasked, _ = _pred_grad(None)
    assert torch.count_nonzero(unmasked[..., : W // 2]) > 0  # without the mask the left half counts
    ones, _ = _pred_grad(torch.ones(2, H, W))
    torch.testing.assert_close(ones, unmasked)  # an all-ones mask is the plain loss


def _rgba_data(root, half_transparent: bool = True):
    root.mkdir(parents=True)
    for i in range(2):
        image = Image.new("RGBA", (64, 64), (200, 40 * i, 10, 255))
        if half_transparent:
            image.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent
        image.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"shape {i}")
    return root


def _masks(plan, data, model):
    fill_cache(plan, data, Loaders(model).text, Loaders(model).ae, progress=False)
    batch = collate([CachedDataset.from_plan(plan.refresh())[i] for i in range(len(plan.captions))])
    return batch


def test_alpha_masks_are_cached_on_the_latent_grid_and_keyed(tmp_path, tiny_dev_dir):
    data_dir = _rgba_data(tmp_path / "data")
    _, data, plain = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    _, data, masked = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", masks="alpha")
    assert {j.key for v in plain.variants for j in v}.isdisjoint(j.key for v in masked.variants for j in v)
    batch = _masks(masked, data, tiny_dev_dir)
    mask = batch["mask"]
    assert mask.shape == batch["latents"].shape[:1] + batch["latents"].shape[2:]  # [B, h, w]
    w = mask.shape[-1]
    assert torch.all(mask[..., : w // 2] == 0) and torch.all(mask[..., w // 2 :] == 1)
    assert "mask" not in _masks(plain, data, tiny_dev_dir)


def test_mask_folder_and_a_missing_mask(tmp_path, tiny_dev_dir):
    data_dir = _rgba_data(tmp_path / "data", half_transparent=False)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        mask = Image.new("L", (32, 32), 255)  # half the image's size: resized to it (blurring the edge)
        mask.paste(0, (0, 16, 32, 32))  # bottom half ignored
        mask.save(masks / f"img{i}.png")
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", masks=str(masks))
    mask = _masks(plan, data, tiny_dev_dir)["mask"]
    h = mask.shape[-2]
    assert torch.all(mask[:, : h // 2 - 1] == 1) and torch.all(mask[:, h // 2 + 1 :] == 0)
    assert torch.all(mask[:, h // 2 - 1] > 0.9) and torch.all(mask[:, h // 2] < 0.1)
    (masks / "img1.png").unlink()
    with pytest.raises(DataError, match=r"data.masks: no mask for .*img1.png in .*masks \(expected img1.png\)$"):
        setup_run(data_dir, tiny_dev_dir, tmp_path / "cache", masks=str(masks))
    with pytest.raises(DataError, match="data.masks must be alpha or an existing folder"):
        DataConfig(masks=str(tmp_path / "nowhere"))
