"""Block swap: with the last N blocks streamed from host memory, the loss and every adapter gradient equal the
run without swapping; each swapped block is on the device only while it runs (forward, and its recomputation in
backward), and the adapters never move."""

from __future__ import annotations

import copy

import pytest
import torch

from flux_lora.inference.offload import location
from flux_lora.lora.peft_adapters import trainable_parameters
from flux_lora.model.flux import PRESETS
from flux_lora.training.block_swap import BlockSwap, swap_order
from flux_lora.training.block_wrappers import enable_gradient_checkpointing

from helpers.dit import dit_inputs, lora_dit
from helpers.offload import FakeAccelerator, realign


def _loss_and_grads(model, inputs, target):
    loss = torch.nn.functional.mse_loss(model(**inputs), target)
    return loss.detach(), torch.autograd.grad(loss, trainable_parameters(model))


def test_swapped_blocks_give_the_same_loss_and_gradients_and_move_only_while_running():
    p = PRESETS["tiny"]
    plain = lora_dit(p, random_b=True)
    enable_gradient_checkpointing(plain)
    swapped = realign(copy.deepcopy(plain))
    plain = realign(plain)
    inputs = dit_inputs(p, lat_h=8, lat_w=8, txt_len=5, seed=3)
    target = torch.randn(inputs["img"].shape, generator=torch.Generator().manual_seed(4))
    loss_ref, grads_ref = _loss_and_grads(plain, inputs, target)

    fake, events, seen = FakeAccelerator(), [], []
    blocks = swap_order(swapped)
    swap = BlockSwap(swapped, fake, count=3, on_move=lambda action, name: events.append((action, name)))
    names = [n for n, _ in swap.swapped]
    assert names == ["double_blocks.1", "single_blocks.0", "single_blocks.1"]
    adapters = {id(t) for t in trainable_parameters(swapped)}

    def snapshot(name):
        def hook(module, args, output):
            seen.append((name, [location(b, fake) for n, b in blocks if n in names]))

        return hook

    hooks = [b.register_forward_hook(snapshot(n), prepend=True) for n, b in blocks]  # before the unload
    try:
        loss, grads = _loss_and_grads(swapped, inputs, target)
        swap.release()  # the trainer does this after each step
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    # forward in order, then the recomputations in backward in reverse order: one block on the device at a time
    assert events == [(a, n) for n in names for a in ("load", "unload")] + [
        (a, n) for n in reversed(names) for a in ("load", "unload")
    ]
    for name, where in seen:  # while a swapped block runs it alone is on the device (adapters never count)
        expected = ["mixed" if n == name else "host" for n in names]
        assert where == expected, (name, where)
    assert all(location(b, fake) == "host" for n, b in blocks if n in names)
    assert {id(t) for t in trainable_parameters(swapped)} == adapters
    swap.remove()


def test_block_count_is_checked():
    model = lora_dit(PRESETS["tiny"])
    with pytest.raises(ValueError, match="between 1 and 4"):
        BlockSwap(model, FakeAccelerator(), count=5)
