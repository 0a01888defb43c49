"""The closed form of the bytes spent feeding fp8 weights to their GEMMs (``benchmarks/accounting.py``) against
the memory model's per-op count of a full-size FLUX.1-dev step: what the one-pass dequantize saves over
scaling the weight is the same in both."""

from __future__ import annotations

from dataclasses import replace

import pytest

import flux_lora.model.fp8 as fp8
from benchmarks.accounting import fp8_weight_bytes, tokens
from benchmarks.memory_model import TrainCase, train_case
from flux_lora.model.flux import PRESETS


@pytest.mark.parametrize("res", [512, 1024])
def test_one_pass_saving_matches_the_memory_model(monkeypatch, res):
    """At full width, 2 double and 4 single blocks (the whole model: ``python benchmarks/memory_model.py``)."""
    p = replace(PRESETS["flux-dev"], depth=2, depth_single_blocks=4)
    case = TrainCase(res=res, base="fp8", checkpointing="full")
    one_pass = train_case(case, p)["GB_moved"]
    monkeypatch.setattr(fp8, "scale_on_activations", lambda rows, in_features, dtype: False)
    two_pass = train_case(case, p)["GB_moved"]
    n_img, n_txt = tokens(res, res, p.max_sequence_length)

    def closed(route):
        return fp8_weight_bytes(p, n_img, n_txt, route=route, checkpointing=True) / 1e9

    saved = closed("two_pass") - closed("one_pass")
    assert saved > 1
    assert two_pass - one_pass == pytest.approx(saved, rel=0.01)


def test_routes_order_and_row_rule():
    p = PRESETS["flux-dev"]
    small, large = tokens(512, 512, 512), tokens(1024, 1024, 512)

    def gb(n, route):
        return fp8_weight_bytes(p, *n, route=route, checkpointing=True) / 1e9

    assert gb(small, "fp8_gemm") < gb(small, "one_pass") < gb(small, "two_pass") == gb(large, "two_pass")
    assert gb(small, "one_pass") < gb(large, "one_pass") < gb(large, "two_pass")  # 1024 px: img rows > inputs
