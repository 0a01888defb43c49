"""The blocks the trainer compiles (FP8Linear, peft LoRA, checkpoint wrappers, fp8 GEMMs) trace into one graph
each, with no graph break: a break would split the compiled region and cost a host round trip per block."""

from __future__ import annotations

import pytest
import torch

from flux_lora import sampling as S
from flux_lora.config import LoraConfig
from flux_lora.lora.peft_adapters import inject_lora, set_input_casting
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.fp8 import quantize_, set_fp8_matmul
from flux_lora.training.block_wrappers import enable_gradient_checkpointing


@pytest.mark.parametrize(
    "variant", ["fp8", "fp8 + checkpointing", "fp8 + selective checkpointing", "fp8 GEMMs + no peft cast"]
)
def test_blocks_trace_without_graph_breaks(variant):
    torch.manual_seed(0)
    p = PRESETS["tiny"]
    model = Flux(p)
    quantize_(model)
    model.requires_grad_(False)
    inject_lora(model, LoraConfig(rank=4, alpha=4.0))
    if "checkpointing" in variant:
        enable_gradient_checkpointing(model, selective="selective" in variant)
    if "GEMMs" in variant:
        assert set_fp8_matmul(model) > 0
        set_input_casting(model, False)
    b, n, length = 2, 16, 5
    txt, img = torch.randn(b, length, p.hidden_size), torch.randn(b, n, p.hidden_size)
    vec = torch.randn(b, p.hidden_size)
    pe = model.pe_embedder(torch.cat([S.txt_ids(b, length), S.img_ids(b, 8, 8)], dim=1))
    torch._dynamo.reset()
    double = torch._dynamo.explain(model.double_blocks[0])(img, txt, vec, pe)
    single = torch._dynamo.explain(model.single_blocks[0])(torch.cat([txt, img], dim=1), vec, pe)
    for name, report in (("double", double), ("single", single)):
        reasons = [str(r.reason) for r in report.break_reasons]
        assert report.graph_break_count == 0 and report.graph_count == 1, (name, reasons)
