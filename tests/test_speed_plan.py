"""``auto`` compile and fp8 GEMMs: on only on CUDA GPUs of compute capability >= 8.9; explicit settings win."""

from __future__ import annotations

import pytest

from flux_lora.config import ModelConfig
from flux_lora.training.speed import SpeedPlan, plan_speed

FP8 = "float8_e4m3fn"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        (None, SpeedPlan(False, False, False)),
        ((8, 6), SpeedPlan(False, False, False)),
        ((8, 9), SpeedPlan(True, True, False)),
        ((9, 0), SpeedPlan(True, True, False)),
    ],
)
def test_auto_follows_the_device(capability, expected):
    assert plan_speed(ModelConfig(quantize=FP8), capability) == expected


def test_auto_fp8_gemms_need_an_fp8_base_and_explicit_settings_win():
    assert plan_speed(ModelConfig(), (9, 0)) == SpeedPlan(True, False, False)
    assert plan_speed(ModelConfig(quantize=FP8, compile=False), (9, 0)) == SpeedPlan(False, False, False)
    assert plan_speed(ModelConfig(quantize=FP8, fp8_matmul=True), None) == SpeedPlan(False, True, False)
    assert plan_speed(ModelConfig(compile=True, selective_checkpointing=True), None) == SpeedPlan(True, False, True)


def test_contradictions_are_one_line_errors():
    with pytest.raises(ValueError, match="needs an fp8 base"):
        plan_speed(ModelConfig(fp8_matmul=True), (9, 0))
    with pytest.raises(ValueError, match="needs model.gradient_checkpointing"):
        plan_speed(ModelConfig(gradient_checkpointing=False, selective_checkpointing=True), None)


def test_yaml_values_parse():
    from flux_lora.config import load_config

    cfg = load_config(
        None, ["--model.compile", "auto", "--model.fp8_matmul", "false", "--model.selective_checkpointing", "true"]
    )
    assert (cfg.model.compile, cfg.model.fp8_matmul, cfg.model.selective_checkpointing) == ("auto", False, True)
    assert load_config(None, ["--model.compile", "false"]).model.compile is False


def test_the_module_applies_the_plan():
    """fp8 GEMMs on the block Linears and selective checkpoint wrappers, as FluxLoraModule builds the DiT."""
    import torch

    from flux_lora.config import LoraConfig, TrainConfig
    from flux_lora.model.flux import PRESETS, Flux
    from flux_lora.model.fp8 import FP8Linear, quantize_
    from flux_lora.training.module import FluxLoraModule

    def load(device: torch.device) -> Flux:
        dit = Flux(PRESETS["tiny"])
        quantize_(dit)
        return dit.requires_grad_(False)

    module = FluxLoraModule(
        load,
        LoraConfig(rank=2, alpha=2.0),
        TrainConfig(),
        gradient_checkpointing=True,
        selective_checkpointing=True,
        fp8_matmul=True,
    )
    module.configure_model()
    switched = [n for n, m in module.dit.named_modules() if isinstance(m, FP8Linear) and m.fp8_matmul]
    assert any(n.endswith("img_attn.qkv.base_layer") for n in switched)
    assert any(n.endswith("img_mod.lin.base_layer") for n in switched)  # modulation too, through the wrappers
    wrapped = [m for m in module.dit.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == 4 and all("context_fn" in repr(m.checkpoint_fn.keywords) for m in wrapped)


def test_block_swap_rules():
    plan = plan_speed(ModelConfig(quantize=FP8, blocks_to_swap=10), (9, 0))
    assert plan.blocks_to_swap == 10 and not plan.compile  # auto stays eager with swapping
    with pytest.raises(ValueError, match="CUDA GPU"):
        plan_speed(ModelConfig(blocks_to_swap=4), None)
    with pytest.raises(ValueError, match="needs model.gradient_checkpointing"):
        plan_speed(ModelConfig(blocks_to_swap=4, gradient_checkpointing=False), (8, 6))
    with pytest.raises(ValueError, match="runs eager"):
        plan_speed(ModelConfig(blocks_to_swap=4, compile=True), (9, 0))
    with pytest.raises(ValueError, match=">= 0"):
        plan_speed(ModelConfig(blocks_to_swap=-1), (9, 0))


def test_the_module_swaps_blocks_at_train_start_and_releases_after_each_step(monkeypatch):
    """The module builds its BlockSwap once Lightning has placed it (on_train_start) and sends the last
    recomputed block back after every step; a fake device stands in for the GPU."""

    from flux_lora.config import LoraConfig, TrainConfig
    from flux_lora.inference.offload import location
    from flux_lora.model.flux import PRESETS, Flux
    from flux_lora.training import module as module_mod
    from flux_lora.training.module import FluxLoraModule

    from helpers.dit import dit_inputs
    from helpers.offload import FakeAccelerator

    fake = FakeAccelerator()
    monkeypatch.setattr(module_mod, "Transfer", lambda device: fake)
    module = FluxLoraModule(
        lambda device: Flux(PRESETS["tiny"]).requires_grad_(False),
        LoraConfig(rank=2, alpha=2.0),
        TrainConfig(),
        gradient_checkpointing=True,
        blocks_to_swap=2,
    )
    module.configure_model()
    module.on_train_start()
    swap = module.block_swap
    assert swap is not None and [n for n, _ in swap.swapped] == ["single_blocks.0", "single_blocks.1"]
    module.dit(**dit_inputs(PRESETS["tiny"], lat_h=8, lat_w=8, txt_len=5)).square().mean().backward()
    assert [location(b, fake) for _, b in swap.swapped] == ["mixed", "host"]  # the last one recomputed
    module.on_train_batch_end(None, None, 0)
    assert [location(b, fake) for _, b in swap.swapped] == ["host", "host"]
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
