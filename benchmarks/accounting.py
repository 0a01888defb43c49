"""Analytic FLOP and parameter accounting for the FLUX DiT, derived from ``FluxParams`` (pure functions).

The same formulas price the scaled-down CPU model (where ``bench_cpu`` checks them against torch's FLOP counter)
and full-size FLUX.1-dev (where ``bench_gpu`` turns measured seconds into FLOP utilisation). Conventions:

* a Linear costs ``2 * in * out`` FLOPs per row it is applied to (bias adds are not counted);
* attention costs ``4 * S^2 * D`` per block forward (``Q K^T`` and ``P V``), its backward 2.5 times that (a flash
  kernel recomputes ``Q K^T``);
* training with a frozen base: each base Linear costs forward + input gradient (2x), each LoRA factor forward +
  input gradient + weight gradient (3x); gradient checkpointing runs the blocks' forward once more.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from flux_lora.model.flux import FluxParams

ATTENTION_BACKWARD = 2.5
DEFAULT_TARGETS = ("double_blocks.*", "single_blocks.*")
WeightRoute = Literal["two_pass", "one_pass", "fp8_gemm"]


@dataclass(frozen=True)
class LinearSpec:
    """One Linear of the DiT: BFL name, shape, and what its rows are (``img``/``txt`` tokens, ``all`` tokens of
    the joint sequence, or ``sample``: once per sample, e.g. modulation and the conditioning embedders)."""

    name: str
    in_features: int
    out_features: int
    rows: str

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features


def dit_linears(p: FluxParams) -> list[LinearSpec]:
    """Every Linear of the DiT in module order, with its shape and row kind."""
    d, m = p.hidden_size, p.mlp_hidden_dim
    out = [
        LinearSpec("img_in", p.in_channels, d, "img"),
        LinearSpec("time_in.in_layer", 256, d, "sample"),
        LinearSpec("time_in.out_layer", d, d, "sample"),
        LinearSpec("vector_in.in_layer", p.vec_in_dim, d, "sample"),
        LinearSpec("vector_in.out_layer", d, d, "sample"),
    ]
    if p.guidance_embed:
        out += [
            LinearSpec("guidance_in.in_layer", 256, d, "sample"),
            LinearSpec("guidance_in.out_layer", d, d, "sample"),
        ]
    out.append(LinearSpec("txt_in", p.context_in_dim, d, "txt"))
    for i in range(p.depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            out += [
                LinearSpec(f"{b}_mod.lin", d, 6 * d, "sample"),
                LinearSpec(f"{b}_attn.qkv", d, 3 * d, s),
                LinearSpec(f"{b}_attn.proj", d, d, s),
                LinearSpec(f"{b}_mlp.0", d, m, s),
                LinearSpec(f"{b}_mlp.2", m, d, s),
            ]
    for i in range(p.depth_single_blocks):
        b = f"single_blocks.{i}"
        out += [
            LinearSpec(f"{b}.linear1", d, 3 * d + m, "all"),
            LinearSpec(f"{b}.linear2", d + m, d, "all"),
            LinearSpec(f"{b}.modulation.lin", d, 3 * d, "sample"),
        ]
    out += [
        LinearSpec("final_layer.linear", d, p.out_channels, "img"),
        LinearSpec("final_layer.adaLN_modulation.1", d, 2 * d, "sample"),
    ]
    return out


def lora_targets(p: FluxParams, globs: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> list[LinearSpec]:
    """The Linears a LoRA with these target globs wraps (the default: the block Linears, 304 on FLUX.1-dev)."""
    return [s for s in dit_linears(p) if any(fnmatch.fnmatchcase(s.name, g) for g in globs)]


def lora_parameter_count(
    p: FluxParams, rank: int, globs: tuple[str, ...] | list[str] = DEFAULT_TARGETS, rows: tuple[str, ...] | None = None
) -> int:
    """``rank * sum(in + out)`` over the targets (optionally only those whose rows are in ``rows``)."""
    return sum(
        rank * (s.in_features + s.out_features) for s in lora_targets(p, globs) if rows is None or s.rows in rows
    )


def _row_count(rows: str, n_img: int, n_txt: int) -> int:
    return {"img": n_img, "txt": n_txt, "all": n_img + n_txt, "sample": 1}[rows]


def forward_flops(
    p: FluxParams,
    n_img: int,
    n_txt: int,
    batch: int = 1,
    lora_rank: int = 0,
    lora_globs: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
) -> dict[str, float]:
    """FLOPs of one forward pass.

    Returns:
        ``linear`` (token-path Linears), ``per_sample`` (modulation and embedders), ``lora`` (the adapters'
        two factors), ``attention``, and their ``total``.
    """
    targets = {s.name for s in lora_targets(p, lora_globs)} if lora_rank else set()
    token = sample = lora = 0.0
    for s in dit_linears(p):
        n = _row_count(s.rows, n_img, n_txt) * batch
        if s.rows == "sample":
            sample += 2 * n * s.weights
        else:
            token += 2 * n * s.weights
        if s.name in targets:
            lora += 2 * n * lora_rank * (s.in_features + s.out_features)
    seq = n_img + n_txt
    attention = 4.0 * seq * seq * p.hidden_size * (p.depth + p.depth_single_blocks) * batch
    return dict(
        linear=token, per_sample=sample, lora=lora, attention=attention, total=token + sample + lora + attention
    )


def step_flops(
    p: FluxParams,
    n_img: int,
    n_txt: int,
    *,
    checkpointing: bool,
    batch: int = 1,
    lora_rank: int = 16,
    lora_globs: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
) -> float:
    """FLOPs of one LoRA training step (forward + backward) with a frozen base; per-sample Linears need no
    input gradient and are counted once."""
    f = forward_flops(p, n_img, n_txt, batch, lora_rank, lora_globs)
    total = 2 * f["linear"] + 3 * f["lora"] + (1 + ATTENTION_BACKWARD) * f["attention"] + f["per_sample"]
    if checkpointing:
        total += f["linear"] + f["lora"] + f["attention"] + f["per_sample"]
    return total


def tokens(height: int, width: int, n_txt: int, downscale: int = 8) -> tuple[int, int]:
    """Image size in pixels -> ``(image tokens, text tokens)`` (2x2 patches of the latent)."""
    return (height // (2 * downscale)) * (width // (2 * downscale)), n_txt


def _weight_pass_bytes(s: LinearSpec, rows: int, route: WeightRoute, backward: bool) -> int:
    """Bytes one eager pass (forward or input gradient) of an fp8 Linear moves over its weight, the GEMM's read
    included. ``two_pass``: cast (1 read + 2 written), scale (2 + 2), GEMM read (2): 9 per weight.
    ``one_pass`` (``FP8Linear`` since issue 14) with fewer rows than inputs: cast + GEMM read, 5 per weight, plus
    the scale applied to the output (or output gradient), 4 per element; otherwise as ``two_pass``.
    ``fp8_gemm``: the GEMM reads the 1-byte weight; the input gradient first makes a transposed copy (+2)."""
    if route == "fp8_gemm":
        return s.weights * (3 if backward else 1)
    if route == "one_pass" and rows < s.in_features:
        return 5 * s.weights + 4 * rows * s.out_features
    return 9 * s.weights


def fp8_weight_bytes(
    p: FluxParams, n_img: int, n_txt: int, *, route: WeightRoute, checkpointing: bool, batch: int = 1
) -> int:
    """Bytes a LoRA training step moves to feed the fp8 block weights to their GEMMs (eager, no fusion): every
    block Linear runs forward (twice with checkpointing); the token path also runs its input gradient, the
    modulation Linears (whose input needs no gradient) do not."""
    total = 0
    for s in dit_linears(p):
        if not s.name.startswith(("double_blocks.", "single_blocks.")):
            continue
        rows = _row_count(s.rows, n_img, n_txt) * batch
        total += (2 if checkpointing else 1) * _weight_pass_bytes(s, rows, route, backward=False)
        if s.rows != "sample":
            total += _weight_pass_bytes(s, rows, route, backward=True)
    return total
