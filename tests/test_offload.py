"""Memory modes on a CPU-only machine.

There is no second computing device here, so the "accelerator" is a fake one on the CPU: a copy to it is a
clone the fake remembers, and a tensor is "on the accelerator" exactly when it is one of those clones. The
tests therefore prove the mechanics (which tensors each module points at, at each moment, through the real
hooks and swaps; outputs bit-identical to no offload; host tensors restored), not transfer speed, pinned
memory or CUDA streams: the CUDA path has a test marked ``gpu``, not run on CPU-only machines.
"""

from __future__ import annotations

import pytest
import torch

from flux_lora.inference.offload import BlockOffload, Transfer, location
from flux_lora.lora.runtime import apply_loras
from flux_lora.model.fp8 import FP8
from flux_lora.weights.loading import load_flow_model

from helpers.dit import dit_inputs
from helpers.lora import random_lora
from helpers.offload import FakeAccelerator, realign, while_each_block_runs

KW = dict(height=32, width=48, num_inference_steps=2, seed=0, true_cfg=2.0, output_type="pt", progress=False)


@pytest.fixture(scope="module")
def baseline(dev_pipe) -> torch.Tensor:
    return dev_pipe("a dog", **KW)


@pytest.fixture
def fake(dev_pipe):
    """The fake accelerator and a list for its moves; the shared pipeline leaves offloading afterwards."""
    fake, events = FakeAccelerator(), []
    yield fake, events
    dev_pipe.enable_offload(None)


def _tensor_ids(module: torch.nn.Module) -> list[int]:
    """Storage addresses of a module's tensors (``p.data`` is a new Python object on every access)."""
    return [t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]]


def test_model_offload_moves_each_component_only_while_it_runs(dev_pipe, baseline, fake):
    fake, events = fake
    parts = {"text_encoders": dev_pipe.text_encoders, "dit": dev_pipe.dit, "ae": dev_pipe.ae}
    host_ids = {name: _tensor_ids(m) for name, m in parts.items()}
    seen = {}

    def snapshot(stage):
        def hook(*args) -> None:
            seen.setdefault(stage, {n: location(m, fake) for n, m in parts.items()})

        return hook

    hooks = [
        dev_pipe.text_encoders.t5.register_forward_hook(snapshot("encode")),
        dev_pipe.dit.double_blocks[0].register_forward_hook(snapshot("denoise")),
        dev_pipe.ae.decoder.register_forward_hook(snapshot("decode")),
    ]
    try:
        dev_pipe.enable_offload("model", transfer=fake, on_move=lambda *e: events.append(e))
        out = dev_pipe("a dog", **KW)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, baseline)
    assert seen == {
        "encode": {"text_encoders": "device", "dit": "host", "ae": "host"},
        "denoise": {"text_encoders": "host", "dit": "device", "ae": "host"},
        "decode": {"text_encoders": "host", "dit": "host", "ae": "device"},
    }
    # prompt and negative prompt go through the encoders in one pass
    assert events == [(a, n) for n in parts for a in ("load", "unload")]
    # afterwards every module points at its original host tensors again
    assert {name: _tensor_ids(m) for name, m in parts.items()} == host_ids


def test_block_offload_streams_one_block_at_a_time(dev_pipe, baseline, fake):
    fake, events = fake
    model = dev_pipe.dit
    blocks = [*model.double_blocks, *model.single_blocks]
    seen = []

    def snapshot(i) -> None:
        seen.append(
            (
                i,
                [j for j, b in enumerate(blocks) if location(b, fake) == "device"],
                location(model.img_in, fake),
                location(model.final_layer, fake),
                location(dev_pipe.text_encoders, fake),
                location(dev_pipe.ae, fake),
            )
        )

    hooks = while_each_block_runs(model, snapshot)
    try:
        dev_pipe.enable_offload("block", transfer=fake, on_move=lambda *e: events.append(e))
        assert [location(b, fake) for b in blocks] == ["host"] * len(blocks)
        out = dev_pipe("a dog", **KW)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, baseline)
    n = len(blocks)
    assert len(seen) == 2 * 2 * n  # 2 steps, 2 DiT calls each (true CFG)
    for i, on_device, img_in, final, text, ae in seen:
        # the running block and the prefetched next one
        assert on_device == ([i, i + 1] if i + 1 < n else [i])
        assert (img_in, final, text, ae) == ("device", "device", "host", "host")
    assert [location(b, fake) for b in blocks] == ["host"] * n  # nothing left behind between calls
    assert location(model.img_in, fake) == "device"  # non-block parts stay
    loads = [name for action, name in events if action == "load" and "blocks" in name]
    order = [f"dit.{group}.{i}" for group in ("double_blocks", "single_blocks") for i in range(2)]
    assert loads[:n] == order
    dev_pipe.enable_offload(None)
    assert location(model, fake) == "host"


@pytest.mark.parametrize("quantize", [None, "float8_e4m3fn"])
def test_block_offload_with_peft_adapters_runtime_loras_and_fp8(tiny_dev_dir, quantize):
    from peft import LoraConfig, inject_adapter_in_model

    model = load_flow_model(tiny_dev_dir, dtype=torch.float32, quantize=quantize)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["qkv"], init_lora_weights=False)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # peft makes them fp8 on an fp8 base
    apply_loras(model, [(random_lora(model, ["single_blocks.1.linear1"]), 1.0, "style")])
    realign(model)
    x = dit_inputs(model.params)
    with torch.no_grad():
        expected = model(**x)
        fake = FakeAccelerator()
        wrapper = model.double_blocks[1].img_attn.qkv
        seen = []

        def record(*args) -> None:
            seen.append(
                (
                    location(wrapper.lora_A, fake),
                    wrapper.base_layer.weight.dtype,
                    fake.is_on_device(wrapper.base_layer.weight),
                )
            )

        hook = wrapper.register_forward_hook(record)
        offload = BlockOffload(model, fake)
        out = model(**x)
        hook.remove()
        offload.remove()
    assert torch.equal(out, expected)
    assert seen == [("device", FP8 if quantize else torch.float32, True)]
    assert location(model, fake) == "host"


def test_stale_blocks_are_released_after_a_failed_forward(tiny_dev_dir):
    model = realign(load_flow_model(tiny_dev_dir, dtype=torch.float32))
    x = dit_inputs(model.params)
    with torch.no_grad():
        expected = model(**x)
        fake = FakeAccelerator()
        offload = BlockOffload(model, fake)

        def boom(*args):
            raise RuntimeError("boom")

        hook = model.single_blocks[0].register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            model(**x)
        hook.remove()
        # left behind by the failure
        assert [location(b, fake) for b in model.single_blocks] == ["device"] * 2
        assert torch.equal(model(**x), expected)
        assert all(location(b, fake) == "host" for b in [*model.double_blocks, *model.single_blocks])
        offload.release()
        offload.remove()


@pytest.mark.gpu
def test_block_offload_on_cuda(tiny_dev_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = load_flow_model(tiny_dev_dir, dtype=torch.bfloat16, quantize="float8_e4m3fn", device="cuda")
    x = {k: v.cuda() for k, v in dit_inputs(model.params).items()}
    x["txt"], x["img"], x["y"] = (x[k].bfloat16() for k in ("txt", "img", "y"))
    with torch.no_grad():
        expected = model(**x)
        cuda = Transfer("cuda")
        offload = BlockOffload(model, cuda)
        assert all(p.device.type == "cpu" and p.is_pinned() for p in model.double_blocks.parameters())
        out = model(**x)
        torch.cuda.synchronize()
        assert all(p.device.type == "cpu" for p in model.single_blocks.parameters())
        offload.remove()
    assert torch.equal(out, expected)
