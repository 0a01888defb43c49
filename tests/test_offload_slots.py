"""Block offload and block swap through a fixed pair of device buffers (``DeviceSlots``).

The fake accelerator logs every slot allocation, copy, event record and wait in call order; the tests interleave
the blocks' runs and moves with that log and check what the CUDA path relies on: two slots allocated for a whole
denoising loop, block ``k`` in slot ``k % 2``, its copies ordered before it runs, and a slot overwritten only after
the block that used it ran. Outputs stay bit-identical to no offload (dev and schnell, with a LoRA applied)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from flux_lora.inference.control import ControlNetUnit
from flux_lora.inference.offload import BlockOffload, DeviceSlots, Transfer, location
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.lora.runtime import apply_loras
from flux_lora.model.flux import PRESETS
from flux_lora.training.block_swap import BlockSwap
from flux_lora.training.block_wrappers import enable_gradient_checkpointing
from flux_lora.weights.loading import load_flow_model

from helpers.dit import dit_inputs, lora_dit
from helpers.lora import random_lora
from helpers.offload import (
    FakeAccelerator,
    assert_slot_order,
    block_names,
    mark_blocks,
    realign,
    while_each_block_runs,
)

KW = dict(height=32, width=48, num_inference_steps=3, seed=0, output_type="pt", progress=False)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def lora_pipe(request, tiny_dev_dir, tiny_schnell_dir) -> FluxPipeline:
    """A tiny pipeline with a run-time LoRA on a double and a single block (their buffers stream too)."""
    folder = tiny_dev_dir if request.param == "dev" else tiny_schnell_dir
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32, device="cpu")
    lora = random_lora(pipe.dit, ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"], seed=5)
    apply_loras(pipe.dit, [(lora, 1.0, "style")])
    for module in (pipe.dit, pipe.ae, pipe.text_encoders):
        realign(module)
    return pipe


def test_a_denoising_loop_streams_through_two_slots_in_order(lora_pipe):
    baseline = lora_pipe("a dog", **KW)
    fake = FakeAccelerator()
    dit, names = lora_pipe.dit, block_names(lora_pipe.dit)
    blocks = [*dit.double_blocks, *dit.single_blocks]
    in_slots = []

    def run(i: int) -> None:
        storages = {t.untyped_storage().data_ptr() for t in [*blocks[i].parameters(), *blocks[i].buffers()]}
        in_slots.append(storages <= set(fake.buffers))

    hooks = mark_blocks(dit, fake.log) + while_each_block_runs(dit, run)
    try:
        lora_pipe.enable_offload("block", transfer=fake, on_move=lambda *e: fake.log.append(e))
        out = lora_pipe("a dog", **KW)
    finally:
        for h in hooks:
            h.remove()
        lora_pipe.enable_offload(None)
    assert torch.equal(out, baseline)
    allocs = [e for e in fake.log if e[0] == "alloc"]
    largest = max(BlockOffload.largest_of(b) for b in blocks)
    assert allocs == [("alloc", 0, largest), ("alloc", 1, largest)]  # once for the whole loop, both full size
    assert len(in_slots) == 3 * len(blocks) and all(in_slots)  # every block ran from a slot
    assert_slot_order(fake.log, names)


def test_the_order_check_fails_without_the_events(dev_pipe):
    """The check above can fail: the same run with the events dropped is caught."""

    class NoEvents(FakeAccelerator):
        def wait(self, stream, event) -> None:
            pass

    fake = NoEvents()
    hooks = mark_blocks(dev_pipe.dit, fake.log)
    try:
        dev_pipe.enable_offload("block", transfer=fake, on_move=lambda *e: fake.log.append(e))
        dev_pipe("a dog", **{**KW, "num_inference_steps": 2})
    finally:
        for h in hooks:
            h.remove()
        dev_pipe.enable_offload(None)
    with pytest.raises(AssertionError):
        assert_slot_order(fake.log, block_names(dev_pipe.dit))


def test_a_slot_in_use_is_never_overwritten(tiny_dev_dir):
    model = realign(lora_dit(PRESETS["tiny"]))
    slots = DeviceSlots(FakeAccelerator())
    slots.load(0, "a", model.double_blocks[0])
    with pytest.raises(RuntimeError, match="slot 0 still holds a; cannot load b"):
        slots.load(2, "b", model.single_blocks[0])
    with pytest.raises(RuntimeError, match="still hold"):
        slots.free()


def test_block_swap_streams_through_two_slots_in_order():
    p = PRESETS["tiny"]
    plain = lora_dit(p, random_b=True)
    enable_gradient_checkpointing(plain)
    swapped = realign(copy.deepcopy(plain))
    plain = realign(plain)
    inputs = dit_inputs(p, lat_h=8, lat_w=8, txt_len=5, seed=3)
    target = torch.randn(inputs["img"].shape, generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.mse_loss(plain(**inputs), target)
    expected.backward()
    fake = FakeAccelerator()
    swap = BlockSwap(swapped, fake, count=3, on_move=lambda *e: fake.log.append(e))
    names = [n for n, _ in swap.swapped]
    inner = [swap.swapped[0][1].img_attn.qkv] + [b.linear1 for _, b in swap.swapped[1:]]
    hooks = [
        m.register_forward_hook(lambda *a, n=n: fake.log.append(("run", n))) for n, m in zip(names, inner, strict=True)
    ]
    try:
        for _ in range(2):  # two steps: the slots stay
            loss = torch.nn.functional.mse_loss(swapped(**inputs), target)
            loss.backward()
            swap.release()
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(loss.detach(), expected.detach())
    for (name, a), b in zip(swapped.named_parameters(), plain.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a.grad, 2 * b.grad), name
    assert [e[0] for e in fake.log if e[0] == "alloc"] == ["alloc", "alloc"]
    assert_slot_order(fake.log, names)
    assert all(location(b, fake) == "host" for _, b in swap.swapped)
    swap.remove()


def test_a_controlnet_shares_the_two_slots(dev_pipe, tiny_controlnet_dir):
    cn = realign(dev_pipe.load_controlnet(tiny_controlnet_dir))
    image = Image.fromarray(np.random.default_rng(15).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    kw = dict(prompt="a house", controlnets=[ControlNetUnit(cn, image)], **KW)
    baseline = dev_pipe(**kw)
    fake = FakeAccelerator()
    hooks = mark_blocks(dev_pipe.dit, fake.log) + mark_blocks(cn, fake.log, "controlnet.0")
    try:
        dev_pipe.enable_offload("block", transfer=fake, on_move=lambda *e: fake.log.append(e))
        out = dev_pipe(**kw)
    finally:
        for h in hooks:
            h.remove()
        dev_pipe.enable_offload(None)
    assert torch.equal(out, baseline)
    largest = max(BlockOffload.largest_of(b) for m in (cn, dev_pipe.dit) for b in [*m.double_blocks, *m.single_blocks])
    assert [e for e in fake.log if e[0] == "alloc"] == [("alloc", 0, largest), ("alloc", 1, largest)]
    assert {e[1] for e in fake.log if e[0] == "load"} >= {"controlnet.0.double_blocks.0", "dit.single_blocks.1"}
    assert_slot_order(fake.log, block_names(cn, "controlnet.0"), block_names(dev_pipe.dit))


def test_a_failed_call_frees_the_slots_and_keeps_its_error(dev_pipe, tiny_controlnet_dir):
    cn = realign(dev_pipe.load_controlnet(tiny_controlnet_dir))
    image = Image.fromarray(np.random.default_rng(15).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    kw = dict(prompt="a house", controlnets=[ControlNetUnit(cn, image)], **KW)

    def boom(*args):
        raise RuntimeError("boom")

    fake = FakeAccelerator()
    hook = dev_pipe.dit.single_blocks[0].register_forward_pre_hook(boom)
    try:
        dev_pipe.enable_offload("block", transfer=fake)
        with pytest.raises(RuntimeError, match="boom"):  # the DiT's failure, not the cleanup's
            dev_pipe(**kw)
        assert dev_pipe.placement.slots.nbytes == 0
        assert location(dev_pipe.dit, fake) == "mixed"  # its small parts stay; no block is left behind
        assert all(location(b, fake) == "host" for b in [*dev_pipe.dit.double_blocks, *dev_pipe.dit.single_blocks])
    finally:
        hook.remove()
        dev_pipe.enable_offload(None)


def test_memory_is_reported_only_on_cuda(monkeypatch):
    def no_cuda(*args):
        raise AssertionError("CUDA asked on a CPU transfer")

    monkeypatch.setattr(torch.cuda, "memory_reserved", no_cuda)
    monkeypatch.setattr(torch.cuda, "memory_allocated", no_cuda)
    assert Transfer("cpu").memory() is None
    assert FakeAccelerator().record("compute") == 1  # the fake's events; a CPU Transfer records none
    assert Transfer("cpu").record("compute") is None


@pytest.mark.gpu
def test_block_offload_on_cuda_holds_two_slots(tiny_dev_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = load_flow_model(tiny_dev_dir, dtype=torch.bfloat16, quantize="float8_e4m3fn", device="cuda")
    x = {k: v.cuda() for k, v in dit_inputs(model.params).items()}
    x["txt"], x["img"], x["y"] = (x[k].bfloat16() for k in ("txt", "img", "y"))
    with torch.no_grad():
        expected = model(**x)
        offload = BlockOffload(model, Transfer("cuda"))
        outs = [model(**x) for _ in range(3)]
        torch.cuda.synchronize()
        assert offload.slots.nbytes == 2 * offload.largest()
        memory = offload.transfer.memory()
        assert memory is not None and memory["reserved_GB"] >= memory["allocated_GB"]
        offload.remove()
    assert all(torch.equal(out, expected) for out in outs)
