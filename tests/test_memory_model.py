"""The memory model (``benchmarks/memory_model.py``): full-size FLUX.1-dev on fake CPU tensors, live bytes counted.

The counter is checked against storages whose sizes are known, then the issue's bounds are asserted on the
full-size estimates (the figures are in benchmarks/RESULTS.md)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.memory_model import GPUS, InferCase, LiveBytes, TrainCase, infer_case, train_case

GB = 1e9


def test_live_bytes_counts_allocations_not_views_and_frees():
    with FakeTensorMode(), LiveBytes() as live:
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 B
        view = a[:10]  # a view: no allocation
        a.add_(1)  # in place: no allocation
        b = a * 2  # 4,000 B more
        del b
        c = torch.empty(500, dtype=torch.bfloat16)  # 1,000 B, after b died
        live.mark("all")
    assert live.peak == 8000
    assert live.current == 5000
    assert live.stages == {"all": 8000}
    del view, c


def test_fp8_gemms_are_priced_at_the_fp8_rate():
    with FakeTensorMode():
        a, b = torch.empty(4096, 4096, dtype=torch.bfloat16), torch.empty(4096, 4096, dtype=torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one, live = torch.ones((), dtype=torch.float32), LiveBytes()
        with live:
            torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            a @ b
    flops = 2 * 4096**3
    assert live.flops == 2 * flops and live.fp8_flops == flops
    h100 = GPUS["H100 SXM"]
    limit = live.summary(0)["roofline_estimate_s"]["H100 SXM"]["compute_limit"]
    assert limit == pytest.approx(flops / h100["fp8_flops"] + flops / h100["flops"])
    assert h100["fp8_flops"] == 2 * h100["flops"]


def test_compiled_estimate_fuses_elementwise_chains_between_gemms():
    """``relu(x * 2 + 1) @ w``: eagerly each op reads and writes; fused, x is read once and the GEMM's input
    written once."""
    n = 1024
    with FakeTensorMode():
        x, w = torch.empty(n, n), torch.empty(n, n)  # made outside the count: in memory, as weights are
        live = LiveBytes()
        with live:
            y = ((x * 2 + 1).relu() @ w).sum()
            del y
    t = 4 * n * n  # bytes of one [n, n] float32 tensor
    assert live.bytes_moved == 2 * t + 2 * t + 2 * t + 3 * t + t + 4  # mul, add, relu, mm, sum
    assert live.fused_bytes == (t + t) + 3 * t + t  # chain: x in, relu's output out; mm; sum (its scalar unread)
    row = live.summary(0)["roofline_estimate_s"]["H200"]
    assert row["compiled_fused"] < row["eager_ops"]


@pytest.fixture(scope="module")
def train_1024():
    return train_case(TrainCase(res=1024, base="fp8", checkpointing="full", rank=16))


def test_training_1024_fp8_checkpointed_fits(train_1024):
    row = train_1024
    # static: fp8 DiT 11.98 GB + LoRA 0.31 GB + AdamW moments 0.61 GB (the B1/B4 closed forms)
    assert row["static_GB"] == pytest.approx(11.981 + 3 * 0.3063, abs=0.02)
    assert row["peak_GB"] <= 16.5, row
    # the trainer's step: peft's input cast off under bf16 autocast (with it on, 15.72 GB: float32 copies of inputs)
    assert row["peak_GB"] == pytest.approx(15.446, abs=0.01), row
    assert row["TFLOP"] == pytest.approx(247.0, rel=0.01)  # the analytic checkpointed rank-16 step (B7)


def test_inference_1024_fp8_block_offload_fits():
    row = infer_case(InferCase(offload="block"))
    assert row["peak_GB"] <= 12.0, row
    assert row["stage_peak_GB"]["encode"] > 9.5  # T5-XXL in bf16 (9.52 GB) is on the device while it encodes
    assert row["stage_peak_GB"]["denoise"] < 3.0  # the DiT's two block slots, its small parts, activations
