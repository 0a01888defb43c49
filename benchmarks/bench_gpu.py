"""GPU benchmark: full-size FLUX.1-dev (random weights, nothing to download) LoRA training and inference.

    python benchmarks/bench_gpu.py --out results.json            # everything, time-boxed to ~9.5 minutes
    python benchmarks/bench_gpu.py --out quick.json --quick      # ~2-minute smoke run of every code path
    python benchmarks/bench_gpu.py --parts infer --out infer.json
    python benchmarks/bench_gpu.py --out x.json --list             # the rows a run would measure, in order

Parts: ``train`` (ours: fp8 blocks + rank-16 LoRA on the 304 block Linears, batch 1, cached-embedding-shaped
inputs, 512 and 1024 px, with/without gradient checkpointing, eager/compiled blocks), ``peer`` (the same for
diffusers' FluxTransformer2DModel + peft LoRA + fp8 layerwise casting), ``infer`` (1024 px, 28 steps: bf16, fp8,
fp8 + model offload, fp8 + block offload, with real-size random text encoders), ``trainer`` (the first training
configuration timed through ``L.Trainer``: the shipped ``FluxLoraModule`` and data module on a cache of the bench
size, beside the bare step row; see ``benchmarks/gpu_trainer.py``).
A training step is the trainer's: the flow-matching loss of the shipped FLUX.1-dev experiment
(``flux_lora.training.loss``) under Lightning's bf16-mixed autocast, backward, gradient clipping, its optimizer;
the peer gets the same draws, inputs and loss.
Peak memory is ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` (reset per configuration); step
times are medians of CUDA events after warm-up; FLOP utilisation divides the analytic step FLOPs
(benchmarks/accounting.py) by the time.
Results are written after every configuration, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import accounting as A
from benchmarks import gpu_models
from benchmarks.common import (
    GB,
    SMALL,
    empty_embedding,
    free,
    make_batch,
    optimizer,
    peak_gb,
    shipped_loss,
    shipped_train_config,
    sync,
    time_steps,
    train_step,
)
from benchmarks.gpu_infer import MODES, run_inference
from benchmarks.gpu_trainer import trainer_row
from flux_lora.atomic import write_text_atomic
from flux_lora.model.flux import PRESETS

RANK, N_TXT = 16, 512
PARTS = ("train", "peer", "infer", "trainer")
TRAINER_MIN_S = 120.0  # the trainer row builds encoders, fills a cache and a DiT, then steps: ~1 min at full size
# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("4090", 165.0),
    ("3090", 71.0),
)
GOALS = {  # the project's targets, at 1024 px with gradient checkpointing
    "peak_GB": 18.0,
    "eager_s_per_step": 0.75,
    "compiled_s_per_step": 0.48,
    "best_s_per_step": 0.30,  # the speed goal: the fastest configuration (compiled, fp8 GEMMs) on an H100/H200
}


@dataclass(frozen=True)
class BenchConfig:
    res: int
    checkpointing: bool
    compiled: bool
    fp8_matmul: bool = False  # torch._scaled_mm for the block Linears (set_fp8_matmul)
    selective: bool = False  # selective checkpointing: attention outputs kept
    kontext: bool = False  # FLUX.1 Kontext pairs: a reference of the target's size, twice the image tokens

    @property
    def name(self) -> str:
        parts = [f"{self.res}px", "ckpt" if self.checkpointing else "no-ckpt", "compiled" if self.compiled else "eager"]
        extra = ["fp8-gemm"] * self.fp8_matmul + ["selective"] * self.selective + ["kontext"] * self.kontext
        return " ".join(parts + extra)

    @property
    def build(self) -> tuple[bool, bool, bool, bool, bool]:
        """What one model build fixes (the resolutions of a group share it); Kontext rows are a group of their own,
        run last."""
        return self.checkpointing, self.compiled, self.fp8_matmul, self.selective, self.kontext


def train_matrix(quick: bool = False, sizes: tuple[int, int] = (1024, 512), compile: bool = True) -> list[BenchConfig]:
    """Configurations in priority order (the goals' first), grouped so one model build serves both sizes."""
    hi, lo = sizes
    if quick:
        configs = [BenchConfig(hi, True, False), BenchConfig(lo, True, False), BenchConfig(lo, True, True)]
    else:
        groups = [(True, False), (True, True), (False, False), (False, True)]
        configs = [BenchConfig(res, ckpt, comp) for ckpt, comp in groups for res in (hi, lo)]
        configs += [BenchConfig(res, True, True, fp8_matmul=True) for res in (hi, lo)]
        configs += [BenchConfig(res, True, True, fp8_matmul=True, selective=True) for res in (hi, lo)]
        configs += [BenchConfig(hi, True, False, kontext=True)]  # the shipped Kontext config's step
    return [c for c in configs if compile or not c.compiled]


def schedule(parts: set[str], configs: list[BenchConfig]) -> list[tuple[str, list[BenchConfig]]]:
    """The run order: per (checkpointing, compiled) group, ours then the peer; inference right after the first
    group, so a time-boxed run measures the goals, their peer ratios and inference before the rest."""
    groups: dict[tuple[bool, bool, bool, bool, bool], list[BenchConfig]] = {}
    for c in configs:
        groups.setdefault(c.build, []).append(c)
    jobs: list[tuple[str, list[BenchConfig]]] = []
    for i, group in enumerate(groups.values()):
        jobs += [(part, group) for part in ("train", "peer") if part in parts]
        if i == 0 and "infer" in parts:
            jobs.append(("infer", []))
        if i == 0 and "trainer" in parts:
            jobs.append(("trainer", group[:1]))  # the goal configuration through Lightning, beside its bare row
    if not groups and "infer" in parts:
        jobs.append(("infer", []))
    return jobs


def planned_rows(jobs: list[tuple[str, list[BenchConfig]]], peer_fp8_always: bool = False) -> list[str]:
    """One line per row a run of ``jobs`` measures, in order (``--list``)."""
    rows = []
    for part, group in jobs:
        if part == "infer":
            rows += [f"infer: {name}" for name, _, _ in MODES]
            continue
        for c in group:
            skip = peer_skip(part, c)
            bf16 = part == "peer" and not skip and peer_bf16_storage(c, peer_fp8_always)
            rows.append(
                f"{part}: {c.name}" + (f" (skipped: {skip})" if skip else "") + (" (bf16 storage)" if bf16 else "")
            )
    return rows


PEER_COMPILED_CKPT = (
    "bf16 storage: diffusers' enable_layerwise_casting (fp8 storage) + compile_repeated_blocks + "
    "enable_gradient_checkpointing fails in backward with torch.utils.checkpoint's CheckpointError (the recomputed "
    "block saves the float8_e4m3fn weights where the forward saved their bf16 casts; diffusers 0.42.1, torch 2.13, "
    "reproduced on the CPU at tiny size; without layerwise casting it runs), so this row stores the weights in bf16: "
    "its time compares, its memory does not (--peer-fp8-always tries fp8)"
)


def peer_skip(part: str, config: BenchConfig) -> str | None:
    """Why a peer row is not run, or ``None``: diffusers has no fp8 GEMM path nor selective checkpointing (and
    its peer step takes no Kontext reference)."""
    unmatched = config.fp8_matmul or config.selective or config.kontext
    return "no peer equivalent" if part == "peer" and unmatched else None


def peer_bf16_storage(config: BenchConfig, fp8_always: bool = False) -> bool:
    """Whether the peer runs ``config`` with bf16 weights: its fp8 storage fails compiled with checkpointing
    (:data:`PEER_COMPILED_CKPT`)."""
    return config.compiled and config.checkpointing and not fp8_always


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


def step_cost(
    params, res: int, checkpointing: bool, n_txt: int = N_TXT, rank: int = RANK, kontext: bool = False
) -> float:
    """Analytic FLOPs of one LoRA step at ``res`` x ``res`` px with ``n_txt`` text tokens, batch 1 (Kontext: the
    DiT runs on the target's and the reference's tokens, twice as many)."""
    n_img, n_txt = A.tokens(res, res, n_txt)
    return A.step_flops(params, n_img * (2 if kontext else 1), n_txt, checkpointing=checkpointing, lora_rank=rank)


def goal_report(train: list[dict]) -> dict:
    """The goals against the measured rows (missing rows give ``measured: None``)."""
    measured = [
        r for r in train if "median_s_per_step" in r and r.get("kind", "ours") == "ours" and not r.get("kontext")
    ]
    rows = {(r["res"], r["checkpointing"], r["compiled"]): r for r in measured if not r.get("fp8_matmul")}
    eager, comp = rows.get((1024, True, False)), rows.get((1024, True, True))
    at_goal = [r for r in measured if r["res"] == 1024 and r["checkpointing"]]
    best = min(at_goal, key=lambda r: r["median_s_per_step"], default=None)
    out = {}
    for key, row, field, goal in (
        ("1024px ckpt eager peak_GB", eager, "peak_allocated_GB", GOALS["peak_GB"]),
        ("1024px ckpt compiled peak_GB", comp, "peak_allocated_GB", GOALS["peak_GB"]),
        ("1024px ckpt eager s/step", eager, "median_s_per_step", GOALS["eager_s_per_step"]),
        ("1024px ckpt compiled s/step", comp, "median_s_per_step", GOALS["compiled_s_per_step"]),
        ("1024px ckpt best s/step (goal 0.30)", best, "median_s_per_step", GOALS["best_s_per_step"]),
        ("1024px ckpt best peak_GB", best, "peak_allocated_GB", GOALS["peak_GB"]),
    ):
        measured = row[field] if row else None
        out[key] = dict(goal=goal, measured=measured, met=None if measured is None else measured <= goal)
    return out


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def run_training(
    kind: str, params, device: str, configs: list[BenchConfig], args, budget: Budget, save, rows: list[dict]
) -> None:
    """Build each (checkpointing, compiled) model once, then time each resolution on it, appending to ``rows``;
    a failure (e.g. out of memory) is recorded in its rows and the next group runs."""
    groups: dict[tuple[bool, bool, bool, bool], list[BenchConfig]] = {}
    for c in configs:
        groups.setdefault(c.build, []).append(c)
    for group in groups.values():
        done = len(rows)
        try:
            _train_group(kind, params, device, group, args, budget, save, rows)
        except Exception as e:  # out of memory, compile failure: keep going
            measured = {r["res"] for r in rows[done:]}
            rows += [
                dict(kind=kind, **vars(c), error=f"{type(e).__name__}: {str(e)[:300]}")
                for c in group
                if c.res not in measured
            ]
            save()
        free(device)


def _train_group(
    kind: str, params, device: str, group: list[BenchConfig], args, budget: Budget, save, rows: list[dict]
) -> None:
    if budget.left() < args.min_config_s:
        rows += [dict(kind=kind, **vars(c), skipped="time budget") for c in group]
        return
    free(device)
    first = group[0]
    why = peer_skip(kind, first)
    if why:
        rows += [dict(kind=kind, **vars(c), skipped=why) for c in group]
        return
    if kind == "ours":
        model = gpu_models.ours(
            params,
            device,
            rank=RANK,
            checkpointing=first.checkpointing,
            compiled=first.compiled,
            fp8_matmul=first.fp8_matmul,
            selective=first.selective,
        )
    else:
        bf16 = peer_bf16_storage(first, args.peer_fp8_always)
        model = gpu_models.peer(
            params, device, rank=RANK, checkpointing=first.checkpointing, compiled=first.compiled, fp8=not bf16
        )
    cfg = shipped_train_config()
    opt = optimizer(model, cfg)
    peak = peak_tflops(torch.cuda.get_device_name() if device.startswith("cuda") else "")
    for c in group:
        row = dict(kind=kind, **vars(c))
        if kind == "peer":
            row["storage"] = "fp8" if not bf16 else PEER_COMPILED_CKPT
        if budget.left() < args.min_config_s:
            rows.append({**row, "skipped": "time budget"})
            continue
        batch = make_batch(params, c.res // 8, c.res // 8, args.txt_tokens, device=device)
        if c.kontext:  # the reference fitted to the target's bucket, as the trainer does
            batch["reference"] = batch["latents"].clone()
        empty = empty_embedding(params, args.txt_tokens, device=device)
        loss_fn = shipped_loss if kind == "ours" else gpu_models.peer_loss
        step = functools.partial(
            train_step, functools.partial(loss_fn, model, batch, cfg, empty), opt, cfg.gradient_clip
        )
        free(device)
        if c.compiled:
            torch._dynamo.reset()  # a fresh compile per size: no dynamic-shape recompile is timed as a step
        start = time.perf_counter()
        time_steps(step, device, 0, args.warmup + 2 * c.compiled)  # warm-up (and compilation)
        warmup_s = time.perf_counter() - start
        times = time_steps(step, device, 0, args.steps)
        flops = step_cost(params, c.res, c.checkpointing, args.txt_tokens, kontext=c.kontext)
        med = statistics.median(times)
        row.update(
            peak_allocated_GB=peak_gb(device),
            peak_reserved_GB=peak_gb(device, reserved=True),
            median_s_per_step=med,
            steps_timed=len(times),
            min_s=min(times),
            warmup_s=warmup_s,
            step_TFLOP=flops / 1e12,
            achieved_TFLOPs=flops / med / 1e12,
            utilisation_of_bf16_peak=None if peak is None else flops / med / 1e12 / peak,
        )
        if args.profile and not any("profile" in r for r in rows):
            trace = args.out.with_name(f"{args.out.stem}.{kind}.{c.res}px.trace.json")
            row["profile"] = profile_steps(step, device, trace)
        rows.append(row)
        save()


def run_trainer(params, config: BenchConfig, args, budget: Budget, result: dict) -> None:
    """The trainer row of ``config`` (:mod:`benchmarks.gpu_trainer`), beside its bare row when measured."""
    row: dict = dict(kind="trainer", **vars(config))
    if budget.left() < max(args.min_config_s, TRAINER_MIN_S if args.preset == "flux-dev" else 0):
        result["trainer"].append({**row, "skipped": "time budget"})
        return
    bare = next((r for r in result["train"] if all(r.get(k) == v for k, v in vars(config).items())), None)
    free(args.device)
    try:
        row = trainer_row(params, args.device, config, args, bare, RANK)
    except Exception as e:  # out of memory, compile failure: keep going
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    result["trainer"].append(row)


def profile_steps(step, device: str, trace: Path, steps: int = 2) -> dict:
    """torch.profiler over ``steps`` steps: the top ops by device (or CPU) time, kernel count, Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    prof.export_chrome_trace(str(trace))
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    events = prof.key_averages()
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return dict(
        steps=steps,
        trace=trace.name,
        device_kernels_per_step=kernels / steps,
        top_ops=events.table(sort_by=sort, row_limit=25).splitlines(),
    )


def compare(ours: list[dict], peer: list[dict]) -> list[dict]:
    """Peer over ours, per configuration measured by both."""
    key = lambda r: (r["res"], r["checkpointing"], r["compiled"])  # noqa: E731
    mine = {key(r): r for r in ours if "median_s_per_step" in r}
    out = []
    for r in peer:
        m = mine.get(key(r))
        if m and "median_s_per_step" in r:
            out.append(
                dict(
                    res=r["res"],
                    checkpointing=r["checkpointing"],
                    compiled=r["compiled"],
                    time_peer_over_ours=r["median_s_per_step"] / m["median_s_per_step"],
                    memory_peer_over_ours=None
                    if m["peak_allocated_GB"] is None or r.get("storage", "fp8") != "fp8"  # bf16 peer: not alike
                    else r["peak_allocated_GB"] / m["peak_allocated_GB"],
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.partition("\n")
    ap = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON results (rewritten after every configuration); required")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer configurations, steps and images")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    ap.add_argument("--list", action="store_true", help="print the rows a run would measure, in order, and exit")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting configurations after this long (default 570, quick 110)",
    )
    ap.add_argument("--min-config-s", type=float, default=30.0, help="do not start a configuration with less left")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per configuration (10; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (3; quick 1), +2 when compiled")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="flux-dev", help=argparse.SUPPRESS)  # "small": CPU smoke test only
    ap.add_argument("--txt-tokens", type=int, default=N_TXT, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="1024,512", help=argparse.SUPPRESS)  # training sizes, high then low
    ap.add_argument(
        "--peer-fp8-always",
        action="store_true",
        help="fp8 storage for the peer compiled with checkpointing too (fails with diffusers 0.42; bf16 by default)",
    )
    ap.add_argument("--eager-only", action="store_true", help="skip the torch.compile configurations")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile 2 steps of the first configuration (ours "
        "and peer): top kernels in the JSON, a Chrome trace next to --out",
    )
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    budget = Budget(args.budget_s or (110.0 if args.quick else 570.0))
    params = _params(args.preset)
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; use {', '.join(PARTS)}")
    configs = train_matrix(args.quick, tuple(int(x) for x in args.sizes.split(",")), not args.eager_only)
    if args.list:
        print("\n".join(planned_rows(schedule(parts, configs), args.peer_fp8_always)))
        return 0
    if args.out is None:
        ap.error("--out is required (except with --list)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; run the CPU benchmark (benchmarks/bench_cpu.py) instead", file=sys.stderr)
        return 2
    result: dict = dict(env=_env(args), train=[], peer=[], infer=[], trainer=[], errors=[])
    save = lambda: _write(args.out, result)  # noqa: E731
    if "peer" in parts and importlib.util.find_spec("diffusers") is None:
        result["errors"].append(
            "peer: diffusers is not installed, so the peer comparison is skipped (pip install diffusers)"
        )
        parts.discard("peer")
    for part, group in schedule(parts, configs):
        try:
            if part == "infer":
                run_inference(params, args, budget, save, result["infer"])
            elif part == "trainer":
                run_trainer(params, group[0], args, budget, result)
            else:
                run_training(
                    "ours" if part == "train" else "peer", params, args.device, group, args, budget, save, result[part]
                )
        except Exception as e:  # keep the other parts' figures
            result["errors"].append(f"{part}: {type(e).__name__}: {e}")
        free(args.device)
        save()
    result["peer_over_ours"] = compare(result["train"], result["peer"])
    result["goals"] = goal_report(result["train"])
    result["env"]["wall_s"] = time.perf_counter() - budget.start
    save()
    print(json.dumps(result, indent=2))
    for e in result["errors"]:
        print(f"bench_gpu: {e}", file=sys.stderr)
    return 1 if result["errors"] else 0


def _params(preset: str):
    return SMALL if preset == "small" else PRESETS[preset]


def _env(args) -> dict:
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return dict(
        device=name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        preset=args.preset,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        quick=args.quick,
        command=" ".join(sys.argv),
        bf16_peak_TFLOPs=peak_tflops(name),
        lora_rank=RANK,
        text_tokens=args.txt_tokens,
        total_memory_GB=torch.cuda.get_device_properties(0).total_memory / GB if cuda else None,
    )


def _write(path: Path, result: dict) -> None:
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
