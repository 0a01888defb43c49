"""Which speed features a run uses: compile and fp8 GEMMs, decided from the config and the device.

``auto`` turns a feature on only where it pays and is known to work: ``torch.compile`` of the blocks on CUDA GPUs
of compute capability 8.9 or newer (Ada, Hopper, Blackwell; older GPUs cannot compile fp8 casts, pytorch issue
167082), and fp8 GEMMs (``torch._scaled_mm``) only on an fp8 base that is also compiled there (eager, the
activation quantization costs more than the GEMM saves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_lora.config import ModelConfig

FP8_GEMM_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class SpeedPlan:
    compile: bool
    fp8_matmul: bool
    selective_checkpointing: bool
    blocks_to_swap: int = 0


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device``; ``None`` elsewhere."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def plan_speed(cfg: ModelConfig, capability: tuple[int, int] | None) -> SpeedPlan:
    """``capability``: the CUDA compute capability of the training device, ``None`` for a CPU (or another kind)."""
    modern = capability is not None and capability >= FP8_GEMM_CAPABILITY
    if cfg.blocks_to_swap < 0:
        raise ValueError(f"model.blocks_to_swap must be >= 0, got {cfg.blocks_to_swap}")
    swap = cfg.blocks_to_swap > 0
    if swap and capability is None:
        raise ValueError("model.blocks_to_swap streams blocks to a CUDA GPU: set it to 0 without one")
    if swap and not cfg.gradient_checkpointing:
        raise ValueError("model.blocks_to_swap needs model.gradient_checkpointing true")
    if swap and cfg.compile is True:
        raise ValueError("model.blocks_to_swap runs eager: set model.compile false (or auto)")
    compile_blocks = (modern and not swap) if cfg.compile == "auto" else bool(cfg.compile)
    if cfg.fp8_matmul == "auto":
        fp8_matmul = cfg.quantize is not None and compile_blocks and modern
    else:
        fp8_matmul = bool(cfg.fp8_matmul)
    if fp8_matmul and cfg.quantize is None:
        raise ValueError("model.fp8_matmul true needs an fp8 base: set model.quantize float8_e4m3fn")
    if cfg.selective_checkpointing and not cfg.gradient_checkpointing:
        raise ValueError("model.selective_checkpointing needs model.gradient_checkpointing true")
    return SpeedPlan(compile_blocks, fp8_matmul, cfg.selective_checkpointing, cfg.blocks_to_swap)
