"""Inference part of ``bench_gpu.py``: seconds per image and peak memory at 1024 px, 28 steps, for bf16, fp8,
fp8 + model offload and fp8 + block offload, with real-size text encoders and autoencoder (random weights),
through ``flux_lora.inference.pipeline.FluxPipeline`` and its ``enable_offload``.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import free, peak_gb, random_dit, sync
from benchmarks.gpu_models import autoencoder, text_encoders
from flux_lora.inference.pipeline import FluxPipeline

MODES = (
    ("bf16", None, None),
    ("fp8", "blocks", None),
    ("fp8 + model offload", "blocks", "model"),
    ("fp8 + block offload", "blocks", "block"),
)


def run_inference(params, args, budget, save, rows: list[dict]) -> None:
    """Append one row per memory mode to ``rows`` (``save()`` after each)."""
    device, full = args.device, args.preset == "flux-dev"
    res, steps = (1024, 4 if args.quick else params.default_steps) if full else (64, 2)
    text = text_encoders(params, device, full_size=full)
    ae = autoencoder(device, "flux" if full else "tiny")
    pipe, built = None, "none"
    for name, quantize, offload in MODES:
        row = dict(mode=name, res=res, steps=steps)
        if budget.left() < args.min_config_s:
            rows.append({**row, "skipped": "time budget"})
            continue
        try:
            if built != quantize:  # a new DiT: free the old one first
                if pipe is not None:
                    pipe.enable_offload(None)
                pipe = None
                free(device)
                pipe = FluxPipeline(
                    random_dit(params, device=device, quantize=quantize), ae, text, device=device, dtype=torch.bfloat16
                )
                built = quantize
            pipe.enable_offload(offload)
            call = dict(
                prompt="a benchmark", height=res, width=res, guidance=3.5, seed=0, output_type="pt", progress=False
            )
            pipe(num_inference_steps=1, **call)  # warm-up: kernels, allocator, pinned buffers
            free(device)
            sync(device)
            start = time.perf_counter()
            pipe(num_inference_steps=steps, **call)
            sync(device)
            row.update(
                s_per_image=time.perf_counter() - start,
                peak_allocated_GB=peak_gb(device),
                peak_reserved_GB=peak_gb(device, reserved=True),
            )
        except Exception as e:  # out of memory in one mode: record it, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        save()
