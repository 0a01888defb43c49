"""Exact-size host copies for offload: a module's tensors packed into one buffer (64-byte aligned slots),
not one caching-allocator block each (the pinned one rounds every block up to a power of two)."""

from __future__ import annotations

import pytest
import torch

from flux_lora.inference.offload import ALIGN, pack_host, packed_size, to_host_

from helpers.offload import FakeAccelerator

KW = dict(height=32, width=48, num_inference_steps=2, seed=0, true_cfg=2.0, output_type="pt", progress=False)


class PackingAccelerator(FakeAccelerator):
    """The fake accelerator with host copies packed, as on CUDA (where the buffer is pinned besides)."""

    def __init__(self) -> None:
        super().__init__()
        self.pack = True


def test_pack_host_is_one_exact_size_buffer_of_aligned_views():
    tensors = [
        torch.randn(3, 5),  # 60 B -> 64
        torch.arange(7, dtype=torch.int64),  # 56 B -> 64
        torch.randn(33).to(torch.float8_e4m3fn),  # 33 B -> 64
        torch.randn(2, 64, dtype=torch.bfloat16),  # 256 B
    ]
    packed = pack_host(tensors)
    assert packed_size(tensors) == 64 + 64 + 64 + 256
    storages = {t.untyped_storage().data_ptr() for t in packed}
    assert len(storages) == 1
    # the allocation: the aligned sum, plus at most ALIGN bytes to align its start
    assert packed_size(tensors) <= packed[0].untyped_storage().nbytes() <= packed_size(tensors) + ALIGN
    assert packed[-1].data_ptr() + 256 - packed[0].data_ptr() == packed_size(tensors)
    for p, t in zip(packed, tensors, strict=True):
        assert p.dtype == t.dtype and p.shape == t.shape
        assert torch.equal(p.view(torch.uint8), t.view(torch.uint8))
        assert p.data_ptr() % ALIGN == 0


def test_to_host_packs_a_module_once_per_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 4))
    model[2].weight = torch.nn.Parameter(model[0].weight.detach().T.contiguous())
    model.register_buffer("shared", torch.ones(2))
    model[1].register_buffer("shared", model.shared)  # a buffer tied between two modules
    before = {n: t.clone() for n, t in model.state_dict().items()}
    to_host_(model, PackingAccelerator())
    storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert len(storages) == 1
    assert model.shared is model[1].shared  # packed once, still tied
    size = packed_size([*model.parameters(), model.shared])
    assert size <= next(model.parameters()).untyped_storage().nbytes() <= size + ALIGN
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_with_packed_host_copies_is_bit_identical(dev_pipe, mode):
    reference = dev_pipe("a dog", **KW)
    try:
        dev_pipe.enable_offload(mode, transfer=PackingAccelerator())
        block = dev_pipe.dit.double_blocks[0]
        assert len({t.untyped_storage().data_ptr() for t in block.parameters()}) == 1
        out = dev_pipe("a dog", **KW)
    finally:
        dev_pipe.enable_offload(None)
    assert torch.equal(out, reference)
