"""Memory-aware training presets: which settings fit a card of a given size, from an estimate of the training
step's peak memory (pure Python, no torch: the web UI and ``--help`` import it).

:func:`estimate_peak_gb` is the closed form of the memory model of ``benchmarks/memory_model.py`` (full-size
FLUX.1-dev on fake tensors, live bytes counted; see its rows in ``benchmarks/RESULTS.md``): the static part (DiT
weights, LoRA and its AdamW moments) is exact byte arithmetic over the model's tensors; the step's transient peak
(batch, activations, gradients) is a line in the number of tokens through the two resolutions the model counted
(512 and 1024 px, 512 T5 tokens, batch 1, rank 16), per base dtype and checkpointing. Batch sizes above 1 scale
the per-token part, block swap subtracts the swapped blocks' weights and adds its two device slots. Like the
model it does not see the CUDA context, the allocator's rounding and fragmentation or kernel workspaces:
:func:`preset_for` keeps :func:`margin_gb` free for them. Figures in GB of 10^9 bytes, as the benchmarks'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Base = Literal["fp8", "bf16"]
Checkpointing = Literal["none", "full", "selective"]

CARD_SIZES_GB = (12, 16, 24, 48, 80)
VARIANTS = ("flux-dev", "flux-schnell")  # the same DiT sizes (schnell lacks the 10 M-parameter guidance embedder)
T5_TOKENS = 512

# Bytes of FLUX.1-dev's DiT as the trainer holds it (counted over the model's tensors built on the meta device):
# every weight in bf16, or the block Linears in fp8 with their scales (model.quantize) and the rest in bf16.
WEIGHTS_GB: dict[Base, float] = {"bf16": 23.8027, "fp8": 11.9807}
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
BLOCK_GB: dict[Base, tuple[float, float]] = {"bf16": (0.67966, 0.28318), "fp8": (0.34029, 0.14176)}  # double, single
LORA_PARAMS_PER_RANK = 4_786_176  # rank-r LoRA on the 304 block Linears: r times this many float32 parameters
ADAM_BYTES = 12  # parameter + two AdamW moments, float32, held all along; the gradient (4) is transient

# The memory model's rows (benchmarks/RESULTS.md, "Memory model"): peak GB at 512 and 1024 px, batch 1, rank 16.
MODEL_ROWS: dict[tuple[Base, Checkpointing], tuple[float, float]] = {
    ("fp8", "full"): (13.82, 15.45),
    ("fp8", "selective"): (14.36, 17.06),
    ("fp8", "none"): (25.97, 51.62),
    ("bf16", "full"): (25.57, 27.26),
}
FP8_MATMUL_GB_AT_1024 = 15.78 - 15.45  # the fp8-GEMM row: quantized activations saved for backward
MAX_SWAP = SINGLE_BLOCKS  # beyond the single blocks a step is mostly transfers of the 0.34 GB double blocks


def tokens(resolution: int) -> int:
    """Image tokens (2x2 patches of the 8x latent) plus the T5 tokens of a square ``resolution`` image."""
    return (resolution // 16) ** 2 + T5_TOKENS


def static_gb(base: Base, rank: int = 16) -> float:
    """Weights, LoRA and AdamW moments: what a step starts with."""
    return WEIGHTS_GB[base] + ADAM_BYTES * LORA_PARAMS_PER_RANK * rank / 1e9


def _transient_line(base: Base, checkpointing: Checkpointing) -> tuple[float, float]:
    """(GB at zero tokens, GB per token) of the step's transient peak at batch 1, rank 16."""
    rows = MODEL_ROWS.get((base, checkpointing)) or MODEL_ROWS[("fp8", checkpointing)]  # bf16 holds what fp8 does
    static = static_gb("fp8" if (base, checkpointing) not in MODEL_ROWS else base)
    lo, hi = rows[0] - static, rows[1] - static
    slope = (hi - lo) / (tokens(1024) - tokens(512))
    return lo - slope * tokens(512), slope


def swapped_gb(base: Base, blocks_to_swap: int) -> float:
    """Device memory block swap frees: the last ``blocks_to_swap`` blocks (single blocks first, from the end)
    leave, two slots the size of the largest of them stay."""
    if blocks_to_swap <= 0:
        return 0.0
    double, single = BLOCK_GB[base]
    n_single = min(blocks_to_swap, SINGLE_BLOCKS)
    n_double = min(blocks_to_swap - n_single, DOUBLE_BLOCKS)
    slot = double if n_double else single
    return n_single * single + n_double * double - 2 * slot


def estimate_peak_gb(
    variant: str,
    resolution: int,
    *,
    base: Base = "fp8",
    checkpointing: Checkpointing = "full",
    rank: int = 16,
    batch: int = 1,
    blocks_to_swap: int = 0,
    fp8_matmul: bool = False,
) -> float:
    """Estimated peak GB of one training step of ``variant`` at square ``resolution`` (the memory model's closed
    form; its published rows are reproduced to the hundredth of a GB)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
    if blocks_to_swap and checkpointing != "full":
        raise ValueError("blocks_to_swap needs full gradient checkpointing")
    intercept, slope = _transient_line(base, checkpointing)
    transient = intercept + slope * tokens(resolution) * batch
    transient += 4 * LORA_PARAMS_PER_RANK * (rank - 16) / 1e9  # the LoRA's gradients
    if fp8_matmul and base == "fp8":
        transient += FP8_MATMUL_GB_AT_1024 * tokens(resolution) * batch / tokens(1024)
    return static_gb(base, rank) + transient - swapped_gb(base, blocks_to_swap)


def margin_gb(card_gb: float) -> float:
    """Memory kept free beside the estimate: CUDA context, allocator rounding and fragmentation, workspaces."""
    return 1.0 + 0.08 * card_gb


@dataclass(frozen=True)
class Preset:
    """Settings for a card: ``overrides`` are dotted config keys as ``train.py --key value`` takes them."""

    card_gb: int
    resolution: int
    variant: str
    overrides: dict[str, Any] = field(default_factory=dict)
    peak_gb: float = 0.0  # the estimate (estimate_peak_gb), not a measurement
    fits: bool = False
    notes: str = ""

    def args(self) -> list[str]:
        """The overrides as ``train.py`` arguments (``--model.quantize=null``, ``--data.batch_size=2``)."""
        return [f"--{k}={yaml_value(v)}" for k, v in self.overrides.items()]


def yaml_value(value: Any) -> str:
    """A scalar as YAML and the command line write it (``null``, ``true``, ``float8_e4m3fn``, ``2``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class _Choice:
    base: Base
    checkpointing: Checkpointing
    batch: int
    rank: int = 16
    blocks_to_swap: int = 0


def _choices() -> list[_Choice]:
    """In order of preference: the largest batch first; at a batch, the unquantized base first, then the least
    recomputation; only then block swap (batch 1, fp8, full checkpointing), fewest blocks first, and rank 8."""
    out = [
        _Choice(base, ckpt, batch)
        for batch in (4, 2, 1)
        for base in ("bf16", "fp8")
        for ckpt in ("none", "selective", "full")
    ]
    out += [_Choice("fp8", "full", 1, rank, n) for rank in (16, 8) for n in range(1, MAX_SWAP + 1)]
    return out


def _estimate(variant: str, resolution: int, c: _Choice) -> float:
    # fp8 GEMMs come on by themselves (model.fp8_matmul auto) on cards that compile: counted where they may run
    return estimate_peak_gb(
        variant,
        resolution,
        base=c.base,
        checkpointing=c.checkpointing,
        rank=c.rank,
        batch=c.batch,
        blocks_to_swap=c.blocks_to_swap,
        fp8_matmul=c.blocks_to_swap == 0,
    )


def _overrides(resolution: int, c: _Choice) -> dict[str, Any]:
    return {
        "model.quantize": "float8_e4m3fn" if c.base == "fp8" else None,
        "model.gradient_checkpointing": c.checkpointing != "none",
        "model.selective_checkpointing": c.checkpointing == "selective",
        "model.blocks_to_swap": c.blocks_to_swap,
        "lora.rank": c.rank,
        "lora.alpha": float(c.rank),
        "data.batch_size": c.batch,
        "data.resolution": resolution,
    }


def preset_for(card_gb: int, resolution: int, variant: str = "flux-dev") -> Preset:
    """The preferred settings whose estimated peak stays :func:`margin_gb` below ``card_gb`` (see
    :func:`_choices` for the order); ``fits=False`` with the smallest setting's estimate when none does."""
    if card_gb <= 0 or resolution < 64 or resolution % 16:
        raise ValueError(f"card_gb {card_gb} and resolution {resolution}: a positive size and a multiple of 16 px")
    budget = card_gb - margin_gb(card_gb)
    choices = _choices()
    for c in choices:
        peak = _estimate(variant, resolution, c)
        if peak <= budget:
            return Preset(card_gb, resolution, variant, _overrides(resolution, c), peak, True, _notes(c, budget))
    last = choices[-1]
    peak = _estimate(variant, resolution, last)
    note = (
        f"Nothing fits: even fp8 with checkpointing, batch 1, rank {last.rank} and {last.blocks_to_swap} blocks "
        f"swapped needs about {peak:.1f} GB, over the {budget:.1f} GB usable on a {card_gb} GB card. Try a lower "
        "resolution."
    )
    return Preset(card_gb, resolution, variant, _overrides(resolution, last), peak, False, note)


def _notes(c: _Choice, budget: float) -> str:
    base = "bf16 base (no quantization)" if c.base == "bf16" else "fp8 base"
    ckpt = {"none": "no gradient checkpointing", "selective": "selective checkpointing", "full": "full checkpointing"}
    swap = f", {c.blocks_to_swap} blocks swapped to host memory (slower steps)" if c.blocks_to_swap else ""
    return (
        f"{base}, {ckpt[c.checkpointing]}, batch {c.batch}, rank {c.rank}{swap}. Estimated from the memory model, "
        f"kept under {budget:.1f} GB to leave room for what it does not count."
    )
