"""What fusing a LoRA into fp8 weights costs: re-quantization error against the exact (unfused) LoRA.

    python benchmarks/fused_fp8_error.py [--out fused.json]

The tiny FLUX preset (random weights, every block Linear in float8_e4m3fn with per-channel scales), a random
rank-16 LoRA on every block Linear whose ``delta W`` has a max of ``ratio * max|W|`` per layer, float32
compute on the CPU. For each ratio: the weight error ``max|W_fused - (W + delta)| / max|delta|`` (worst layer)
and the DiT output error ``|v_fused - v_unfused| / |v_unfused - v_base|`` (as a fraction of what the LoRA
changes) and ``/ |v_unfused|``. Unfused is exact by construction (the LoRA runs beside the fp8 weight).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from flux_lora import sampling as S
from flux_lora.atomic import write_text_atomic
from flux_lora.lora.runtime import apply_loras, remove_loras
from flux_lora.lora.weight import LoraWeight
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.fp8 import FP8Linear, quantize_
from flux_lora.weights.tiny import random_flux

RATIOS = (0.01, 0.1, 0.5)


def _inputs(model: Flux, seed: int = 0) -> dict:
    p, g = model.params, torch.Generator().manual_seed(seed)
    img = S.pack(torch.randn(2, p.in_channels // 4, 8, 8, generator=g))
    return dict(
        img=img,
        img_ids=S.img_ids(2, 8, 8),
        txt=torch.randn(2, 8, p.context_in_dim, generator=g),
        txt_ids=S.txt_ids(2, 8),
        timesteps=torch.rand(2, generator=g),
        y=torch.randn(2, p.vec_in_dim, generator=g),
        guidance=torch.full((2,), 3.5) if p.guidance_embed else None,
    )


def _lora(model: Flux, ratio: float, rank: int = 16, seed: int = 0) -> dict[str, LoraWeight]:
    g, out = torch.Generator().manual_seed(seed), {}
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            down = torch.randn(rank, m.in_features, generator=g)
            up = torch.randn(m.out_features, rank, generator=g)
            delta_max = (up @ down).abs().max()
            w_max = m.dequantized_weight(torch.float32).abs().max()
            out[name] = LoraWeight(down, up * (ratio * w_max / delta_max), float(rank))
    return out


@torch.no_grad()
def measure(ratio: float) -> dict[str, float]:
    model = random_flux(PRESETS["tiny"], 0)
    quantize_(model, lambda n, m: n.startswith(("double_blocks", "single_blocks")))
    x = _inputs(model)
    base = model(**x)
    lora = _lora(model, ratio)
    apply_loras(model, [(lora, 1.0, "exact")])
    unfused = model(**x)
    remove_loras(model)
    before = {n: model.get_submodule(n).dequantized_weight(torch.float32) for n in lora}
    apply_loras(model, [(lora, 1.0, "fused")], mode="fused")
    fused = model(**x)
    worst = max(
        (
            (model.get_submodule(n).dequantized_weight(torch.float32) - before[n] - lw.delta()).abs().max()
            / lw.delta().abs().max()
        ).item()
        for n, lw in lora.items()
    )
    return {
        "ratio_delta_to_weight": ratio,
        "weight_error_of_max_delta": worst,
        "output_error_of_lora_effect": ((fused - unfused).norm() / (unfused - base).norm()).item(),
        "output_error_of_output": ((fused - unfused).norm() / unfused.norm()).item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"model": "tiny preset, blocks in fp8 (per-channel)", "rank": 16, "rows": [measure(r) for r in RATIOS]}
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.out is not None:
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
