"""Output preservation: the adapted model's prediction for preservation prompts is pulled towards the frozen
base's on the same noisy latents and times; its draws come after the others, its base pass has adapters off and
no gradient, and a run with it resumes exactly on an fp8 base with gradient checkpointing."""

from __future__ import annotations

import copy
import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from flux_lora.config import LoraConfig, PreservationConfig, TrainConfig, load_config
from flux_lora.lora.peft_adapters import ADAPTER, adapters_disabled, inject_lora, lora_layers
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.text_encoders import TextEmbeddings
from flux_lora.training.loss import (
    OutputPreservation,
    dit_inputs,
    draw,
    flow_matching_loss,
    preservation_loss,
    weighted_mse,
    with_prompts,
)

from helpers.training import ROOT, fit, tiny_config

P = PRESETS["tiny"]
CFG = TrainConfig(loss_weighting="cosmap", guidance=3.5, max_steps=3, gradient_clip=None)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(3, P.in_channels // 4, 8, 6, generator=g),
        txt=torch.randn(3, 7, P.context_in_dim, generator=g),
        y=torch.randn(3, P.vec_in_dim, generator=g),
    )


def _prompts(count: int = 4) -> TextEmbeddings:
    g = torch.Generator().manual_seed(5)
    return TextEmbeddings(
        torch.randn(count, 7, P.context_in_dim, generator=g), torch.randn(count, P.vec_in_dim, generator=g)
    )


@pytest.fixture(scope="module")
def models() -> tuple[Flux, Flux]:
    """The frozen base, and a copy with rank-2 adapters whose up matrices are not zero (a trained LoRA)."""
    torch.manual_seed(0)
    base = Flux(P).eval()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, LoraConfig(rank=2, alpha=2, targets=["double_blocks.*", "single_blocks.*"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(adapted).values():
            up = layer.lora_B[ADAPTER].weight
            up.copy_(torch.randn(up.shape, generator=g) * 0.3)
    return base, adapted


def test_preservation_draws_come_after_the_others():
    """Turning preservation on leaves noise, times and caption dropout as they were; each sample then gets one
    preservation prompt index, drawn from the same generator."""
    shape, cfg = torch.Size([5, 16, 8, 8]), TrainConfig(caption_dropout=0.3)
    plain = draw(shape, cfg, torch.Generator().manual_seed(9))
    kept = draw(shape, cfg, torch.Generator().manual_seed(9), preservation_prompts=3)
    assert plain.preserve is None and kept.preserve is not None
    assert torch.equal(plain.noise, kept.noise) and torch.equal(plain.t, kept.t) and torch.equal(plain.drop, kept.drop)
    assert kept.preserve.shape == (5,) and int(kept.preserve.min()) >= 0 and int(kept.preserve.max()) < 3
    again = draw(shape, cfg, torch.Generator().manual_seed(9), preservation_prompts=3).preserve
    assert torch.equal(kept.preserve, again)


def test_disabled_adapters_compute_the_base_and_come_back(models):
    base, adapted = models
    batch = _batch()
    draws = draw(batch["latents"].shape, CFG, torch.Generator().manual_seed(1))
    inputs, _ = dit_inputs(batch, draws, 3.5, torch.float32, None)
    flags = {n: p.requires_grad for n, p in adapted.named_parameters()}
    with torch.no_grad():
        want, before = base(**inputs), adapted(**inputs)
        with adapters_disabled(adapted):
            off = adapted(**inputs)
        after = adapted(**inputs)
    assert torch.equal(off, want)
    assert not torch.allclose(before, want, atol=1e-3)  # the adapters do change the output
    assert torch.equal(after, before)
    assert {n: p.requires_grad for n, p in adapted.named_parameters()} == flags


def test_the_loss_adds_the_weighted_gap_to_the_base_on_the_same_noisy_latents(models):
    """loss(with preservation, weight w) = flow-matching loss + w * MSE(adapted, base) on the batch's own noisy
    latents and times, with each sample's text replaced by its drawn preservation prompt; the gradient reaches
    the adapters only through the adapted pass."""
    base, adapted = models
    batch, prompts, weight = _batch(), _prompts(), 0.7
    pres = OutputPreservation(prompts, weight, lambda: adapters_disabled(adapted))
    total = flow_matching_loss(adapted, batch, CFG, torch.Generator().manual_seed(4), preservation=pres)
    plain = flow_matching_loss(adapted, batch, CFG, torch.Generator().manual_seed(4))

    draws = draw(batch["latents"].shape, CFG, torch.Generator().manual_seed(4), preservation_prompts=4)
    inputs, _ = dit_inputs(batch, draws, 3.5, torch.float32, None)
    kept = with_prompts(inputs, prompts, draws.preserve)
    assert torch.equal(kept["img"], inputs["img"]) and torch.equal(kept["timesteps"], inputs["timesteps"])
    assert torch.equal(kept["txt"], prompts.txt[draws.preserve])
    with torch.no_grad():
        gap = weighted_mse(adapted(**kept), base(**kept), draws.t, "cosmap")
    assert float(gap) > 0
    torch.testing.assert_close(total.detach(), plain.detach() + weight * gap, rtol=1e-6, atol=0)

    params = [p for p in adapted.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total - plain, params)
    with torch.no_grad():
        target = base(**kept)
    direct = torch.autograd.grad(weight * preservation_loss(adapted(**kept), target, draws.t, "cosmap"), params)
    for g, d in zip(grads, direct, strict=True):
        torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-7)


def test_untrained_adapters_have_no_preservation_loss(models):
    """At the start (up matrices zero) the adapted model is the base: the preservation term is exactly zero."""
    base, _ = models
    fresh = copy.deepcopy(base)
    inject_lora(fresh, LoraConfig(rank=2, alpha=2, targets=["double_blocks.*"]))
    pres = OutputPreservation(_prompts(), 5.0, lambda: adapters_disabled(fresh))
    with torch.no_grad():
        a = flow_matching_loss(fresh, _batch(1), CFG, torch.Generator().manual_seed(2), preservation=pres)
        b = flow_matching_loss(fresh, _batch(1), CFG, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="preservation.output_weight > 0 needs preservation.prompts"):
        PreservationConfig(output_weight=1.0)
    with pytest.raises(ValueError, match="preservation.output_weight must be >= 0"):
        PreservationConfig(output_weight=-1.0, prompts=["a"])
    with pytest.raises(ValueError, match="model.blocks_to_swap"):
        load_config(
            ROOT / "configs/tiny.yaml",
            ["--preservation.output_weight=1", "--preservation.prompts=[a red circle]", "--model.blocks_to_swap=2"],
        )
    assert not PreservationConfig().enabled  # off by default


PRESERVE = ("--preservation.output_weight=0.5", '--preservation.prompts=["a red square", "a blue circle"]')
# each caption without the trigger word (ai-toolkit's way): "sks, a blue square ..." -> "a blue square ..."
PER_CAPTION = ("--data.trigger_word=sks", "--preservation.output_weight=0.5", "--preservation.replace_word=sks")


def test_caption_prompts_replace_the_word_and_rows_follow_the_samples():
    cfg = PreservationConfig(output_weight=1.0, replace_word="pink", replacements=["red", "blue"])
    assert cfg.caption_prompts("a Pink circle on the left, small") == [
        "a red circle on the left, small",
        "a blue circle on the left, small",
    ]
    assert cfg.caption_prompts("a pinkish circle") == []  # whole words only
    plain = PreservationConfig(output_weight=1.0, replace_word="sks")
    assert plain.caption_prompts("sks, a dog on a beach") == ["a dog on a beach"]
    pres = OutputPreservation(_prompts(6), 1.0, lambda: adapters_disabled(torch.nn.Identity()), per_sample=2)
    assert pres.choices() == 2
    assert pres.rows(torch.tensor([1, 0, 1])).tolist() == [1, 2, 5]  # sample i's k-th prompt is row 2 i + k
    with pytest.raises(ValueError, match="prompts or replace_word, not both"):
        PreservationConfig(output_weight=1.0, prompts=["a"], replace_word="sks")


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("preserve", [PRESERVE, PER_CAPTION], ids=["prompts", "captions-without-trigger"])
def test_a_run_with_preservation_resumes_exactly_on_fp8(tmp_path, tiny_dev_dir, preserve):
    """fp8 base, gradient checkpointing (tiny.yaml's default), LoRA dropout: 3 steps, stop, resume to 6 equal 6
    straight, bit for bit; and preservation changed what was trained."""
    args = ["--max_steps=6", "--quantize=float8_e4m3fn", "--lora.dropout=0.1", "--train.checkpoint_every_n_steps=3"]
    straight = tiny_config(tmp_path / "a", tiny_dev_dir, *args, *preserve)
    assert straight.model.gradient_checkpointing and straight.preservation.enabled
    fit(straight)
    cut = tiny_config(tmp_path / "b", tiny_dev_dir, *args, *preserve)
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")
    trainer, _ = fit(cut, StopAt(3))
    assert trainer.global_step == 3
    resumed, _ = fit(cut)
    assert resumed.global_step == 6
    plain = tiny_config(tmp_path / "c", tiny_dev_dir, *args, *preserve[:-2])  # the same data, no preservation
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "c" / "cache")
    fit(plain)
    a, b, c = (load_file(str(cfg.output_path / "tiny.safetensors")) for cfg in (straight, cut, plain))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_replace_word_missing_from_captions_stops_before_any_model(tmp_path, tiny_dev_dir):
    from flux_lora.config import DataError
    from flux_lora.training.run import build

    cfg = tiny_config(tmp_path, tiny_dev_dir, "--preservation.output_weight=1", "--preservation.replace_word=zebra")
    with pytest.raises(DataError, match="preservation.replace_word 'zebra' is not in the captions of 8 images"):
        build(cfg)
