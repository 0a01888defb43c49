"""Optional CPU timings (``bench_cpu.py --timing``): trends only, never asserted, never GPU predictions.

* B5: fp8-stored Linear forward + backward over a bf16 Linear's, against the rows per GEMM ``M``. x86 CPUs have
  no fp8 GEMM and convert e4m3 slowly, so the magnitudes exaggerate the GPU's cast cost (1 + ~354/M on an H100);
  only the falling trend transfers.
* B8: Lightning's per-step overhead: a LightningModule loop against a plain PyTorch loop on a model so small that
  the framework dominates.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from flux_lora.model.fp8 import FP8Linear

WARMUP, REPEATS = 5, 20


def _median_seconds(
    fns: dict[str, Callable[[], object]], warmup: int = WARMUP, repeats: int = REPEATS
) -> dict[str, float]:
    """Median seconds of each function, run in turn within each repeat so background load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cast_overhead(width: int = 1024, rows: tuple[int, ...] = (64, 256, 1024, 4096)) -> dict[str, float]:
    """B5: time(fp8 Linear fwd+bwd) / time(bf16 Linear fwd+bwd) per ``M`` (input requires grad, as with LoRA)."""
    g = torch.Generator().manual_seed(0)
    ref = nn.Linear(width, width).bfloat16().requires_grad_(False)
    ref.weight.copy_(torch.randn(width, width, generator=g) * 0.02)
    fp8 = FP8Linear.from_linear(ref)
    out = {}
    for m in rows:
        x = torch.randn(m, width, generator=g).bfloat16().requires_grad_(True)
        t = _median_seconds(
            {
                name: (lambda layer=layer, x=x: layer(x).sum().backward())
                for name, layer in (("bf16", ref), ("fp8", fp8))
            }
        )
        out[f"M={m}"] = t["fp8"] / t["bf16"]
    return out


def lightning_overhead(steps: int = 60) -> dict[str, float]:
    """B8: milliseconds per step of ``Trainer.fit`` and of a plain loop, same tiny model, optimizer and data, on
    one thread (a shared machine's spare core makes two OpenMP threads on tiny ops swing by tens of ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _lightning_overhead(steps)
    finally:
        torch.set_num_threads(threads)


def _lightning_overhead(steps: int) -> dict[str, float]:
    import lightning as L

    torch.manual_seed(0)
    data = [torch.randn(8, 32) for _ in range(steps)]

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, _ = make()

        def training_step(self, batch, _):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Clock(L.Callback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            self.ends.append(time.perf_counter())

    clock = Clock()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10**6,
        callbacks=[clock],
    )
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(Module(), loader)

    model, opt = make()
    ends = []
    for batch in loader:
        model(batch).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())

    def per_step_ms(t: list[float]) -> float:  # median step after the first WARMUP steps
        return statistics.median(b - a for a, b in zip(t[WARMUP:], t[WARMUP + 1 :], strict=False)) * 1e3

    lightning_ms, plain_ms = per_step_ms(clock.ends), per_step_ms(ends)
    return dict(
        lightning_ms_per_step=lightning_ms, plain_ms_per_step=plain_ms, overhead_ms_per_step=lightning_ms - plain_ms
    )


def run_timing() -> dict:
    return dict(
        note="CPU wall-clock trends; not GPU predictions",
        B5_fp8_over_bf16_time=cast_overhead(),
        B8_lightning=lightning_overhead(),
    )
