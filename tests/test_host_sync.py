"""A training step does not wait for the accelerator: the loss, the non-finite guard and the metrics are read
on the host once per logging interval (and at saves), never on the steps between."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from flux_lora.training.guards import NonFiniteLossError

from helpers.syncs import SyncCounter
from helpers.training import ROOT, fit, tiny_config

STEPS, EVERY = 8, 3
# per interval step: the guard's one read of its flags, the console's smoothed loss (and once its first loss),
# and Lightning writing the logger's metrics (loss, lr, grad norm, images/s, tokens/s), one read each
PER_INTERVAL = 8


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("--ema.enabled=true", "--train.accumulate_grad_batches=2"),
        *[(f"--lora.kind={kind}", "--lora.dropout=0.1") for kind in ("lokr", "loha", "dora")],
        ("--preservation.output_weight=0.5", '--preservation.prompts=["a red square", "a blue circle"]'),
        ("--data.trigger_word=sks", "--preservation.output_weight=0.5", "--preservation.replace_word=sks"),
    ],
    ids=["plain", "ema+accumulation", "lokr", "loha", "dora", "output-preservation", "caption-preservation"],
)
def test_no_host_sync_between_logging_intervals(tmp_path, tiny_dev_dir, extra):
    cfg = tiny_config(
        tmp_path,
        tiny_dev_dir,
        f"--max_steps={STEPS}",
        f"--train.log_every_n_steps={EVERY}",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
        *extra,
    )
    counter = SyncCounter()
    fit(cfg, counter)
    between = {s: counter.per_step[s] for s in range(1, STEPS) if s % EVERY}
    assert between == dict.fromkeys(between, 0), f"host syncs on steps between intervals: {dict(counter.per_step)}"
    interval = {s: counter.per_step[s] for s in range(EVERY, STEPS, EVERY)}
    assert max(interval.values()) <= PER_INTERVAL, dict(counter.per_step)


def test_no_host_sync_between_logging_intervals_on_kontext_pairs(tmp_path, tmp_path_factory):
    """The same on FLUX.1 Kontext pairs (the reference's tokens appended, the prediction sliced), with loss masks on
    the targets and output preservation, whose passes take the reference too."""
    from PIL import Image

    from flux_lora.config import load_config
    from flux_lora.toy.pairs import write_pairs
    from flux_lora.weights.tiny import write_tiny_model

    model = write_tiny_model(tmp_path_factory.mktemp("tiny") / "kontext", variant="kontext", seed=2)
    targets, references = write_pairs(tmp_path / "pairs", 4, seed=7, size=32)
    (tmp_path / "masks").mkdir()
    for image in targets.glob("*.png"):
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        mask.save(tmp_path / "masks" / image.name)
    cfg = load_config(
        ROOT / "configs/flux-kontext-dev_lora-r16_fp8.yaml",
        [
            f"--model.source={model}",
            "--model.quantize=none",
            "--model.gradient_checkpointing=false",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.source={targets}",
            f"--data.references={references}",
            f"--data.masks={tmp_path / 'masks'}",
            "--data.resolution=32",
            "--data.batch_size=2",
            "--lora.rank=4",
            "--train.accelerator=cpu",
            "--train.devices=1",
            f"--max_steps={STEPS}",
            f"--train.log_every_n_steps={EVERY}",
            "--train.save_every_n_steps=0",
            "--train.checkpoint_every_n_steps=0",
            "--train.caption_dropout=0.2",
            "--preservation.output_weight=0.5",
            '--preservation.prompts=["a red square", "a blue circle"]',
        ],
    )
    counter = SyncCounter()
    fit(cfg, counter)
    between = {s: counter.per_step[s] for s in range(1, STEPS) if s % EVERY}
    assert between == dict.fromkeys(between, 0), f"host syncs on steps between intervals: {dict(counter.per_step)}"
    interval = {s: counter.per_step[s] for s in range(EVERY, STEPS, EVERY)}
    assert max(interval.values()) <= PER_INTERVAL, dict(counter.per_step)


class NanGradientAt(L.Callback):
    """Puts a NaN into one adapter gradient of optimizer step ``step``; records whether the adapters were all
    finite when the run stopped."""

    def __init__(self, step: int) -> None:
        self.step, self.finite_at_stop = step, None

    def on_after_backward(self, trainer, module) -> None:
        if trainer.global_step + 1 == self.step:
            next(p for p in module.parameters() if p.requires_grad).grad[0, 0] = float("nan")

    def on_exception(self, trainer, module, exception) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        self.finite_at_stop = all(bool(torch.isfinite(p).all()) for p in params)


def test_a_bad_gradient_is_skipped_and_reported_at_the_next_check(tmp_path, tiny_dev_dir):
    cfg = tiny_config(
        tmp_path,
        tiny_dev_dir,
        "--max_steps=8",
        "--train.log_every_n_steps=4",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
    )
    probe = NanGradientAt(2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite adapter gradient at step 2 \(images: .*\.png") as err:
        fit(cfg, probe)
    assert "the run stopped at step 4 and nothing was written since" in str(err.value)
    assert probe.finite_at_stop is True  # the bad update was skipped on the device
    assert not list(cfg.output_path.rglob("*.safetensors")) and not list(cfg.output_path.rglob("*.ckpt"))
