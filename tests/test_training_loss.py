"""flux_lora.training.loss: the one flow-matching loss the trainer and the benchmarks share."""

import copy

import lightning as L
import pytest
import torch

from flux_lora import sampling as S
from flux_lora.config import LoraConfig, TrainConfig
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.text_encoders import TextEmbeddings
from flux_lora.training.loss import draw, flow_matching_loss
from flux_lora.training.module import FluxLoraModule

P = PRESETS["tiny"]
# every option of the objective away from its default, so each one takes part in the comparison
CFG = TrainConfig(caption_dropout=0.5, loss_weighting="cosmap", guidance=3.5, max_steps=3, gradient_clip=None)


def batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        dict(
            latents=torch.randn(2, P.in_channels // 4, 8, 6, generator=g),
            txt=torch.randn(2, 7, P.context_in_dim, generator=g),
            y=torch.randn(2, P.vec_in_dim, generator=g),
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def empty() -> TextEmbeddings:
    g = torch.Generator().manual_seed(1)
    return TextEmbeddings(torch.randn(1, 7, P.context_in_dim, generator=g), torch.randn(1, P.vec_in_dim, generator=g))


@pytest.fixture(scope="module")
def base() -> Flux:
    torch.manual_seed(0)
    return Flux(P).eval()


class Recorder(L.Callback):
    """Before each backward: the module's loss, and ``flow_matching_loss`` on the same weights, batch and seed."""

    def __init__(self, empty: TextEmbeddings):
        self.empty, self.pairs = empty, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch, self.batch_idx = batch, batch_idx

    def on_before_backward(self, trainer, module, loss) -> None:
        with torch.no_grad():
            expected = flow_matching_loss(
                module.dit, self.batch, module.train_cfg, module.step_generator(self.batch_idx), self.empty
            )
        self.pairs.append((loss.detach().clone(), expected))


def test_the_modules_training_step_is_flow_matching_loss_bit_for_bit(base, empty):
    module = FluxLoraModule(
        lambda device: copy.deepcopy(base), LoraConfig(rank=2, alpha=2, init="gaussian"), CFG, empty_embedding=empty
    )
    recorder = Recorder(empty)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=CFG.max_steps,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches(CFG.max_steps), batch_size=None))
    assert len(recorder.pairs) == CFG.max_steps
    for got, expected in recorder.pairs:
        assert torch.equal(got, expected), (got, expected)
    assert len({float(got) for got, _ in recorder.pairs}) == CFG.max_steps  # steps differ: weights, batches, draws


def test_the_loss_depends_only_on_the_generator(base, empty):
    batch = batches(1)[0]

    def loss(seed: int) -> torch.Tensor:
        with torch.no_grad():
            return flow_matching_loss(base, batch, CFG, torch.Generator().manual_seed(seed), empty)

    torch.manual_seed(123)  # the global RNG plays no part
    first = loss(7)
    torch.manual_seed(456)
    assert torch.equal(loss(7), first)
    assert not torch.equal(loss(8), first)


def test_caption_dropout_needs_the_empty_embedding(base):
    with pytest.raises(ValueError, match="train.caption_dropout needs the cached empty-caption embedding"):
        flow_matching_loss(base, batches(1)[0], CFG, torch.Generator().manual_seed(0))


def test_draws_apply_the_configured_shift():
    """The FLUX shift grows with the image token count; "none" leaves the sampled times as drawn."""
    shape = torch.Size([64, 16, 128, 128])  # 1024 px: 4096 tokens, mu = 1.15

    def times(**kw) -> torch.Tensor:
        return draw(shape, TrainConfig(**kw), torch.Generator().manual_seed(0)).t

    plain, flux = times(shift="none"), times(shift="flux")
    assert torch.equal(flux, S.time_shift(1.15, 1.0, plain.double()).float().clamp(1e-5, 1 - 1e-5))
    assert (flux > plain).all()
    assert draw(shape, TrainConfig(), torch.Generator()).drop is None  # no dropout draw by default
