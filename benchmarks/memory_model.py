"""A memory model that holds without a GPU: full-size FLUX.1-dev on fake CPU tensors, live bytes counted.

Every configuration runs through the project's own modules (``Flux`` with ``FP8Linear`` and peft LoRA, the
trainer's :func:`flux_lora.training.loss.flow_matching_loss`, its checkpoint wrappers, AdamW as the shipped config
builds it; for inference ``FluxPipeline`` with its offload ``Placement``), but under ``FakeTensorMode`` with CPU
fake tensors: shapes, dtypes and storages exist, no weight is ever materialised. A ``TorchDispatchMode`` below it
records each storage an op creates and when it dies (weak references), so the peak of live bytes is exact for
this op sequence. What it does not see: the CUDA caching allocator's rounding and fragmentation (reserved >
allocated), the CUDA context, cuBLAS/cuDNN workspaces, and any op that differs between CPU and CUDA kernels (the
CPU flash attention here; CPU autocast's op lists). Figures are **estimates, counted on fake tensors**.

The same pass counts FLOPs (torch's FLOP formulas; CPU flash attention priced as the CUDA kernels; fp8 GEMMs,
``torch._scaled_mm``, at the fp8 rate) and the bytes each non-view op reads and writes, and turns them into a
roofline estimate per GPU: per op the larger of compute time and memory time, summed (an eager lower bound),
beside the pure compute limit. A compiled estimate prices the same ops as if every chain of non-GEMM ops between
two GEMMs (attention counts as one) ran as one fused kernel, as inductor fuses elementwise ops and reductions: a
tensor made and used within such a chain never reaches memory; one a GEMM or a later chain reads is written once.
peft's LoRA layers run without their input cast, as the trainer sets them under bf16 autocast.

Run: ``python benchmarks/memory_model.py [--out memory.json] [--only train|infer]`` (about 1 min per
configuration on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper

from benchmarks.common import (
    GB,
    clip_l_config,
    empty_embedding,
    make_batch,
    shipped_loss,
    shipped_train_config,
    t5_xxl_config,
)
from benchmarks.gpu_models import FixedTokenizer
from benchmarks.measure import CPU_ATTENTION_FLOPS
from flux_lora import sampling as S
from flux_lora.atomic import write_text_atomic
from flux_lora.config import LoraConfig
from flux_lora.inference.denoise import denoise
from flux_lora.inference.offload import OffloadMode, Transfer
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.lora.peft_adapters import inject_lora, set_input_casting, trainable_parameters
from flux_lora.model.autoencoder import AE_PRESETS, AutoEncoder
from flux_lora.model.flux import PRESETS, Flux, FluxParams
from flux_lora.model.fp8 import default_predicate, quantize_, set_fp8_matmul
from flux_lora.model.text_encoders import TextEncoders
from flux_lora.presets import estimate_peak_gb
from flux_lora.training.block_wrappers import enable_gradient_checkpointing
from flux_lora.training.optimizers import import_class

log = logging.getLogger(__name__)

Base = Literal["fp8", "bf16"]
Checkpointing = Literal["none", "full", "selective"]
# Dense rates used for the roofline (see /work/shared/reference/performance.md): bf16 GEMMs at the 790 TFLOP/s
# measured on H100-class cards (spec 989), fp8 GEMMs at the same 80 % of their 1,979 TFLOP/s spec, HBM at the
# spec bandwidth. An estimate, not a measurement.
GPUS = {
    "H100 SXM": dict(flops=790e12, fp8_flops=1580e12, bandwidth=3.35e12),
    "H200": dict(flops=790e12, fp8_flops=1580e12, bandwidth=4.8e12),
}
FP8_GEMMS = (torch.ops.aten._scaled_mm,)
LAUNCH_S = 5e-6  # per kernel of an eager step (CPU dispatch + launch), the low end of 5-8 us
FLOPS = {**flop_registry, **{k: shape_wrapper(v) for k, v in CPU_ATTENTION_FLOPS.items()}}


def _storage_bytes(tensors: Iterator[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, Tensor)]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class FusedTraffic:
    """Bytes a step moves when every chain of non-GEMM ops between two GEMMs is one kernel.

    A non-GEMM op's output stays in registers while only ops of its own chain read it; it is written (once) when a
    GEMM or a later chain reads it, and an in-place output is always written. GEMM operands and outputs move as
    they do eagerly."""

    def __init__(self) -> None:
        self.chain = 0
        self.unwritten: dict[int, tuple[int, int]] = {}  # storage -> (chain that made it, bytes)

    def op(self, ins: list[Tensor], outs: list[Tensor], gemm: bool) -> int:
        moved = 0
        read = set()
        for t in ins:
            sid = t.untyped_storage()._cdata
            read.add(sid)
            made = self.unwritten.get(sid)
            if made is not None and made[0] == self.chain and not gemm:
                continue  # fused: produced and consumed in one kernel
            if made is not None:
                moved += self.unwritten.pop(sid)[1]  # its producer had to write it after all
            moved += _nbytes(t)
        if gemm:
            self.chain += 1  # ops after a GEMM start a new kernel
        for t in outs:
            sid = t.untyped_storage()._cdata
            if gemm or sid in read:  # a GEMM's output, or written in place
                self.unwritten.pop(sid, None)
                moved += _nbytes(t)
            else:
                self.unwritten[sid] = (self.chain, _nbytes(t))
        return moved


class LiveBytes(TorchDispatchMode):
    """Below autograd, above ``FakeTensorMode``: the peak of live bytes among storages created while active, and
    the FLOPs, bytes moved and kernels of the ops run."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0
        self.flops = self.fp8_flops = self.bytes_moved = self.fused_bytes = self.kernels = 0
        self.roofline_s = dict.fromkeys(GPUS, 0.0)
        self.compiled_s = dict.fromkeys(GPUS, 0.0)
        self.fused = FusedTraffic()
        self.stage_peak = 0
        self.stages: dict[str, int] = {}

    def mark(self, stage: str) -> None:
        """End ``stage``: record the peak of live bytes since the previous mark."""
        self._sweep()
        self.stages[stage] = self.stage_peak
        self.stage_peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):  # a storage among the inputs' (a view, an in-place op) is no allocation
            if t.untyped_storage()._cdata not in inputs:
                self._allocated(t.untyped_storage())
        if not func.is_view:
            self._count(func, args, kwargs, out)
        return out

    def _allocated(self, s: torch.UntypedStorage) -> None:
        known = self.live.get(s._cdata)
        if known is not None and not known[0].expired():
            return
        self._sweep()
        self.live[s._cdata] = (StorageWeakRef(s), s.nbytes())
        self.current += s.nbytes()
        self.peak = max(self.peak, self.current)
        self.stage_peak = max(self.stage_peak, self.current)

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def _count(self, func, args, kwargs, out) -> None:
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        moved = sum(_nbytes(t) for t in ins + outs)
        counter = FLOPS.get(func._overloadpacket)
        flops = int(counter(*args, **kwargs, out_val=out)) if counter is not None else 0
        fp8 = func._overloadpacket in FP8_GEMMS
        fused = self.fused.op(ins, outs, gemm=flops > 0)
        self.flops += flops
        self.fp8_flops += flops if fp8 else 0
        self.bytes_moved += moved
        self.fused_bytes += fused
        self.kernels += 1
        for name, gpu in GPUS.items():
            compute = flops / gpu["fp8_flops" if fp8 else "flops"]
            self.roofline_s[name] += max(compute, moved / gpu["bandwidth"])
            self.compiled_s[name] += max(compute, fused / gpu["bandwidth"])

    def summary(self, static_bytes: int) -> dict[str, Any]:
        self._sweep()
        return dict(
            static_GB=static_bytes / GB,
            transient_peak_GB=self.peak / GB,
            peak_GB=(static_bytes + self.peak) / GB,
            stage_peak_GB={k: (static_bytes + v) / GB for k, v in self.stages.items()},
            TFLOP=self.flops / 1e12,
            TFLOP_fp8=self.fp8_flops / 1e12,
            GB_moved=self.bytes_moved / GB,
            GB_moved_fused=self.fused_bytes / GB,
            kernels=self.kernels,
            roofline_estimate_s={
                name: dict(
                    compute_limit=(self.flops - self.fp8_flops) / gpu["flops"] + self.fp8_flops / gpu["fp8_flops"],
                    eager_ops=self.roofline_s[name],
                    eager_ops_plus_launch=self.roofline_s[name] + self.kernels * LAUNCH_S,
                    compiled_fused=self.compiled_s[name],
                )
                for name, gpu in GPUS.items()
            },
        )


@dataclass(frozen=True)
class TrainCase:
    res: int = 1024
    base: Base = "fp8"
    checkpointing: Checkpointing = "full"
    rank: int = 16
    fp8_matmul: bool = False  # the block Linears through torch._scaled_mm (set_fp8_matmul)
    kontext: bool = False  # FLUX.1 Kontext pairs: a reference as large as the target (see with_reference)


@dataclass(frozen=True)
class InferCase:
    offload: OffloadMode | None = None
    res: int = 1024
    base: Base = "fp8"
    kontext: bool = False  # FLUX.1 Kontext: a reference image of the output's size, encoded, its tokens appended


def fake_dit(params: FluxParams, fake: FakeTensorMode, base: Base, rank: int = 0) -> Flux:
    """Full-size DiT as fake CPU tensors: built on the meta device in its storage dtypes (``fp8``: block Linears
    in float8_e4m3fn), LoRA injected there (peft's device moves fail on fake parameters), then ``to_empty``."""
    with torch.device("meta"):
        model = Flux(params).to(torch.bfloat16)
    if base == "fp8":
        quantize_(model, default_predicate("blocks"))
    if rank:
        inject_lora(model, LoraConfig(rank=rank, alpha=rank))
    with fake:
        model.to_empty(device="cpu")
    return model


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The shipped optimizer with its state already there (as from step 2 on), ``foreach`` as CUDA defaults."""
    cfg = shipped_train_config()
    params = trainable_parameters(model)
    opt = import_class(cfg.optimizer)(params, lr=cfg.learning_rate, foreach=True, **cfg.optimizer_args)
    for p in params:
        opt.state[p] = dict(step=torch.tensor(1.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    return opt


def closed_form_gb(case: TrainCase) -> float:
    """The package's closed form of this model (:func:`flux_lora.presets.estimate_peak_gb`, what the presets
    use) for ``case``: it reproduces the rows this model counts; ``run`` logs both to show when they part."""
    return estimate_peak_gb(
        "flux-dev",
        case.res,
        base=case.base,
        checkpointing=case.checkpointing,
        rank=case.rank,
        fp8_matmul=case.fp8_matmul,
    )


def with_reference(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Kontext training batch: each target's reference latents, fitted to the target's bucket as the trainer
    fits them (:mod:`flux_lora.data.pairs`), so the DiT sees twice the image tokens."""
    return {**batch, "reference": batch["latents"].clone()}


def train_case(case: TrainCase, params: FluxParams = PRESETS["flux-dev"]) -> dict[str, Any]:
    """One shipped training step (loss, backward, clipping at 1.0, AdamW) at ``case``; static = weights,
    adapters and optimizer state; transient = everything the step allocates (batch, activations, gradients)."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_dit(params, fake, case.base, case.rank)
    set_fp8_matmul(model, case.fp8_matmul)
    set_input_casting(model, False)  # as the trainer under bf16-mixed: autocast casts the LoRA matmuls itself
    cfg = shipped_train_config()
    with fake:
        if case.checkpointing != "none":
            enable_gradient_checkpointing(model, selective=case.checkpointing == "selective")
        model.train()
        opt = _adamw(model)
        state = [t for s in opt.state.values() for t in s.values() if t.dim()]
        static = _storage_bytes(iter([*model.parameters(), *model.buffers(), *state]))
        live = LiveBytes()
        with live:
            latent = case.res // 8
            batch = make_batch(params, latent, latent, params.max_sequence_length)
            if case.kontext:
                batch = with_reference(batch)
            empty = empty_embedding(params, params.max_sequence_length)
            loss = shipped_loss(model, batch, cfg, empty)
            live.mark("forward")
            loss.backward()
            live.mark("backward")
            torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            live.mark("optimizer")
            del loss, batch, empty
    return {**asdict(case), "kind": "train", **live.summary(static)}


class CloneTransfer(Transfer):
    """The accelerator as fake CPU tensors: a device copy is a clone, i.e. a new storage the count sees."""

    def __init__(self) -> None:
        super().__init__("cpu", pin_memory=False)

    def to_device(self, t: Tensor) -> Tensor:
        return t.clone()


@contextmanager
def _fake_pipeline() -> Iterator[None]:
    """``Module.to`` as a no-op: modules with fake parameters cannot be moved, every fake tensor is already on
    the one fake device, and offload moves go through :class:`CloneTransfer`, not ``to``."""
    to = nn.Module.to
    nn.Module.to = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.to = to  # type: ignore[method-assign]


def fake_encoders(params: FluxParams, fake: FakeTensorMode) -> tuple[TextEncoders, AutoEncoder]:
    """Full-size CLIP-L, T5-XXL (bf16, fixed-length stand-in tokenizers) and autoencoder as fake CPU tensors."""
    from transformers import CLIPTextModel, T5EncoderModel

    clip_cfg = clip_l_config(hidden_size=params.vec_in_dim, projection_dim=params.vec_in_dim)
    with torch.device("meta"):
        clip = CLIPTextModel(clip_cfg).to(torch.bfloat16)
        t5 = T5EncoderModel(t5_xxl_config(d_model=params.context_in_dim)).to(torch.bfloat16)
        ae = AutoEncoder(AE_PRESETS["flux"]).to(torch.bfloat16)
    with fake:
        for m in (clip, t5, ae):
            m.to_empty(device="cpu")
        for name, buf in list(clip.named_buffers()):  # position ids, which to_empty leaves uninitialised
            owner, _, attr = name.rpartition(".")
            setattr(clip.get_submodule(owner), attr, torch.arange(buf.shape[-1]).expand(1, -1))
    text = TextEncoders(clip, FixedTokenizer(clip_cfg.eos_token_id), t5, FixedTokenizer(1), params.max_sequence_length)
    return text, ae.eval()


@torch.no_grad()
def _generate(pipe: FluxPipeline, res: int, mark: Callable[[str], None], kontext: bool = False) -> Tensor:
    """What ``FluxPipeline.__call__`` runs for one prompt, one step (every step allocates the same), without
    its value-dependent parts (the schedule is computed on tensors there): encode, denoise, decode. With
    ``kontext``, a reference of the output's size is encoded by the autoencoder and its tokens join the DiT's."""
    cond = pipe.encode("a memory model")
    mark("encode")
    h = w = res // pipe.ae.params.downscale_factor
    img = S.pack(pipe.noise(1, h, w, torch.Generator().manual_seed(0)))
    ids, tids = S.img_ids(1, h, w), S.txt_ids(1, cond.txt.shape[1])
    reference = None
    if kontext:
        with pipe.placement.use("ae"):  # type: ignore[union-attr]
            reference = S.pack(pipe.ae.encode(torch.zeros(1, 3, res, res, dtype=torch.bfloat16)).float())
        ids = torch.cat([ids, S.reference_ids(1, h, w)], dim=1)
        mark("reference")
    with pipe.placement.use("dit"):  # type: ignore[union-attr]
        img = denoise(pipe.dit, img, ids, cond.txt, tids, cond.y, [1.0, 0.0], 3.5, reference=reference)
    mark("denoise")
    pixels = pipe.decode(S.unpack(img, h, w))
    mark("decode")
    return pixels


def infer_case(case: InferCase, params: FluxParams = PRESETS["flux-dev"]) -> dict[str, Any]:
    """One ``FluxPipeline`` call (prompt to pixels, one denoising step: every step allocates the same) with
    full-size T5-XXL, CLIP-L and autoencoder. Without offload, every component counts as resident; with it,
    only what the placement copies to the device and what the ops allocate."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    dit = fake_dit(params, fake, case.base).eval()
    text, ae = fake_encoders(params, fake)
    with fake, _fake_pipeline():
        pipe = FluxPipeline(dit, ae, text, device="cpu", dtype=torch.bfloat16)
        parts = [dit, ae, text]
        static = 0 if case.offload else _storage_bytes(t for m in parts for t in [*m.parameters(), *m.buffers()])
        live = LiveBytes()
        with live:
            pipe.enable_offload(case.offload, transfer=CloneTransfer())
            _generate(pipe, case.res, live.mark, case.kontext)
            pipe.enable_offload(None, transfer=CloneTransfer())
    return {**asdict(case), "offload": case.offload or "none", "kind": "infer", **live.summary(static)}


TRAIN_CASES = [
    TrainCase(res, base, ckpt)
    for res in (512, 1024)
    for base in ("fp8", "bf16")
    for ckpt in ("full", "selective", "none")
    if base == "fp8" or ckpt == "full"
] + [TrainCase(1024, "fp8", "full", fp8_matmul=True)]
INFER_CASES = [InferCase(mode) for mode in (None, "model", "block")]
# FLUX.1 Kontext: the shipped Kontext config's step (fp8, full checkpointing) and inference with a reference
KONTEXT_CASES: list[TrainCase | InferCase] = [
    TrainCase(512, "fp8", "full", kontext=True),
    TrainCase(1024, "fp8", "full", kontext=True),
    InferCase(None, kontext=True),
    InferCase("block", kontext=True),
]


def run(only: str | None = None, save: Callable[[list[dict]], None] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cases: list[TrainCase | InferCase] = []
    if only in (None, "train"):
        cases += TRAIN_CASES
    if only in (None, "infer"):
        cases += INFER_CASES
    if only in (None, "kontext"):
        cases += KONTEXT_CASES
    for case in cases:
        start = time.perf_counter()
        row = train_case(case) if isinstance(case, TrainCase) else infer_case(case)
        row["cpu_s"] = round(time.perf_counter() - start, 1)
        if isinstance(case, TrainCase) and not case.kontext:  # the closed form knows FLUX.1-dev/schnell only
            log.info("closed form (flux_lora.presets): %.2f GB", closed_form_gb(case))
        log.info("%s", {k: v for k, v in row.items() if k != "roofline_estimate_s"})
        rows.append(row)
        if save is not None:
            save(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here (rewritten after each configuration)")
    ap.add_argument("--only", choices=("train", "infer", "kontext"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def save(rows: list[dict]) -> None:
        if args.out:
            write_text_atomic(args.out, json.dumps(rows, indent=1))

    rows = run(args.only, save)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
