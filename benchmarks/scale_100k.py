"""Issue 24's size benchmark: scan, plan, cache look-up and data-module memory of a 100,000-image dataset.

Builds (once, under ``--dir``; never committed) a synthetic folder of ``--count`` small captioned PNGs in ONE
directory and a tiny random FLUX model, fills the cache with the tiny encoders, then measures in fresh
processes (so no in-process memo helps; the OS page cache is warm, as on a second run of a real job):

* ``scan``: :func:`flux_lora.data.scan.scan_all` of the fully cached set, and ``plan``: :func:`plan_cache`;
* ``memory``: the process's resident memory (``VmRSS``, anonymous part ``RssAnon``, from ``/proc``) before and
  after building the data module (scan, plan, ``setup``, the ``CachedDataset``), and separately the bytes
  Python allocated for it (``tracemalloc``, in its own process because tracing slows everything);
* ``lookup``: seconds per cache look-up (:meth:`CacheStore.usable` of a verified entry, and of a missing one)
  in cache folders holding 1,000 / 10,000 / 100,000 files.

``--profile FILE`` writes a cProfile of the scan + plan. ``--write-entries`` completes the cache through the
cache's own writer with tensors of the encoders' shapes instead of encoding every image (:func:`write_entries`;
the tiny encoders' fill of 100,000 images takes an hour or more on 2 cores). Prints JSON; ``--out`` also writes it.

    python benchmarks/scale_100k.py --dir /tmp/scale100k [--count 100000] [--write-entries] [--out scale.json]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import logging
import os
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.proc_memory import status  # noqa: E402
from flux_lora.atomic import write_text_atomic  # noqa: E402
from flux_lora.config import DataConfig  # noqa: E402

MAX_LENGTH = 32  # the tiny preset's T5 length
SIZES = [(64, 64), (80, 48), (48, 80), (32, 32), (64, 48)]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def generate(data: Path, count: int) -> float:
    """``count`` small PNGs with unique captions in one folder (skipped when already there); seconds spent."""
    from PIL import Image, ImageDraw

    marker = data / ".generated.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"count": count, "distinct": True}:
        return 0.0
    started = time.perf_counter()
    data.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        image = Image.new("RGB", size, ((i * 7) % 256, (i * 13) % 256, (i * 29) % 256))
        ImageDraw.Draw(image).rectangle((4, 4, 4 + i % 20, 4 + (i // 20) % 20), fill=(255 - i % 256, 40, 90))
        image.putpixel((0, 0), (i & 255, (i >> 8) & 255, (i >> 16) & 255))  # every image distinct
        image.save(data / f"{i:06d}.png", compress_level=1)
        (data / f"{i:06d}.txt").write_text(f"picture {i}: a {colour} {shape}")
    past = time.time() - 60  # as a real dataset: written well before it is scanned
    for p in data.iterdir():
        os.utime(p, (past, past))
    write_text_atomic(marker, json.dumps({"count": count, "distinct": True}))
    return time.perf_counter() - started


def data_config(root: Path) -> DataConfig:
    return DataConfig(source=str(root / "data"), resolution=64, cache_dir=str(root / "cache"), encode_batch_size=64)


def specs(model: Path) -> tuple[Any, Any]:
    from flux_lora.data.cache import AutoEncoderSpec, TextEncoderSpec

    return (
        TextEncoderSpec.from_folder(model, MAX_LENGTH, torch.float32),
        AutoEncoderSpec.from_folder(model, torch.float32),
    )


def fill(root: Path) -> dict[str, float]:
    from flux_lora.data.cache import fill_cache, plan_cache
    from flux_lora.data.scan import scan_all
    from flux_lora.model.text_encoders import TextEncoders
    from flux_lora.weights.loading import load_autoencoder

    cfg, model = data_config(root), root / "model"
    started = time.perf_counter()
    data = scan_all(cfg)
    plan = plan_cache(data, cfg, *specs(model))
    first = time.perf_counter() - started
    started = time.perf_counter()
    stats = fill_cache(
        plan,
        data,
        lambda: TextEncoders.from_folder(model, MAX_LENGTH, dtype=torch.float32),
        lambda: load_autoencoder(model, dtype=torch.float32),
        batch_size=64,
        progress=False,
    )
    return {
        "first_scan_plan_s": first,
        "fill_s": time.perf_counter() - started,
        "texts": stats.texts,
        "latents": stats.latents,
    }


def write_entries(root: Path) -> dict[str, Any]:
    """Complete the cache without encoding every image (``--write-entries``): the plan's own keys, written by the
    cache's own writer (:meth:`CacheStore.write_text` / :meth:`CacheStore.write_latent`: same files, same
    safetensors format, checksummed), holding random tensors of the shapes and dtypes the tiny encoders give.
    Those come from real entries: one caption and one image per bucket are encoded by :func:`fill_cache` first.
    A scan and a plan read keys, stamps and checksums, never the values, so they cost what they would after a
    real fill; a real fill with the tiny encoders is compute-bound (about 30 images/s on 2 idle cores: ~1 h at
    100,000, see RESULTS.md)."""
    from flux_lora.data.cache import fill_cache, plan_cache
    from flux_lora.data.scan import scan_all
    from flux_lora.model.text_encoders import TextEncoders
    from flux_lora.weights.loading import load_autoencoder

    cfg, model = data_config(root), root / "model"
    data = scan_all(cfg)
    plan = plan_cache(data, cfg, *specs(model))
    started = time.perf_counter()
    first: dict[Any, Any] = {}  # one missing job per bucket: encoded for real, the shape of its bucket's entries
    for job in plan.missing_latents:
        first.setdefault(job.placement.bucket, job)
    caption = plan.missing_text[0] if plan.missing_text else next(iter(plan.text_keys))
    seeds = replace(plan, variants=[[j] for j in first.values()], text_keys={caption: plan.text_keys[caption]})
    fill_cache(
        seeds,
        data,
        lambda: TextEncoders.from_folder(model, MAX_LENGTH, dtype=torch.float32),
        lambda: load_autoencoder(model, dtype=torch.float32),
        batch_size=64,
        progress=False,
    )
    store = plan.store
    txt, y = store.read_text(plan.text_keys[caption])
    like = {bucket: store.read_latent(job.key) for bucket, job in first.items()}
    encoded = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)

    def rand(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator).to(t.dtype)

    started = time.perf_counter()
    texts = latents = 0
    for c in plan.missing_text:
        if c != caption:
            store.write_text(plan.text_keys[c], rand(txt), rand(y), c)
            texts += 1
    for job in plan.missing_latents:
        if first[job.placement.bucket] is not job:
            store.write_latent(job.key, rand(like[job.placement.bucket]), data.records[job.record].name)
            latents += 1
    store.save_verified(time.time_ns(), {})  # as fill_cache ends: the stamps of what it wrote
    return {
        "encoded_for_real": {"texts": 1, "latents": len(first), "s": encoded},
        "written": {"texts": texts, "latents": latents, "s": time.perf_counter() - started},
        "shapes": {
            "txt": list(txt.shape),
            "y": list(y.shape),
            "latents": {str(b): list(t.shape) for b, t in like.items()},
        },
        "dtypes": sorted({str(t.dtype) for t in [txt, y, *like.values()]}),
    }


def measure(root: Path, profile: str | None) -> dict[str, Any]:
    """Scan + plan + data module of the fully cached set, in this (fresh) process."""
    from flux_lora.data.cache import plan_cache
    from flux_lora.data.datamodule import CachedDataset, FluxDataModule
    from flux_lora.data.scan import scan_all

    cfg, model = data_config(root), root / "model"
    text_spec, ae_spec = specs(model)
    gc.collect()
    before = status()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started, cpu_started = time.perf_counter(), time.process_time()
    data = scan_all(cfg)
    scanned, cpu_scanned = time.perf_counter(), time.process_time()
    plan = plan_cache(data, cfg, text_spec, ae_spec)
    planned, cpu_planned = time.perf_counter(), time.process_time()
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    dm = FluxDataModule(cfg, text_spec, ae_spec, _never, _never, device="cpu", scanned=data)
    dm.plan = plan
    dataset = CachedDataset.from_plan(plan) if plan.complete else None
    gc.collect()
    after = status()
    del dataset
    return {
        "records": len(data.records),
        "complete": plan.complete,
        "missing_latents": len(plan.missing_latents),
        "distinct_latents": len({j.key for jobs in plan.variants for j in jobs}),
        "scan_s": scanned - started,
        "plan_s": planned - scanned,
        "scan_plan_s": planned - started,
        "scan_cpu_s": cpu_scanned - cpu_started,  # CPU time of this process (the 2 cores are shared)
        "plan_cpu_s": cpu_planned - cpu_scanned,
        "load_1min": os.getloadavg()[0],
        "rss_before_mb": before["VmRSS"] / 2**20,
        "rss_after_mb": after["VmRSS"] / 2**20,
        "rss_anon_added_mb": (after["RssAnon"] - before["RssAnon"]) / 2**20,
        "peak_rss_mb": after["VmHWM"] / 2**20,
    }


def traced(root: Path) -> dict[str, float]:
    """Bytes Python allocates for the data module (scan, plan, dataset), by tracemalloc."""
    from flux_lora.data.cache import plan_cache
    from flux_lora.data.datamodule import CachedDataset
    from flux_lora.data.scan import scan_all

    cfg, model = data_config(root), root / "model"
    text_spec, ae_spec = specs(model)
    gc.collect()
    tracemalloc.start()
    data = scan_all(cfg)
    plan = plan_cache(data, cfg, text_spec, ae_spec)
    dataset = CachedDataset.from_plan(plan) if plan.complete else None
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del dataset
    return {"traced_held_mb": current / 2**20, "traced_peak_mb": peak / 2**20}


def lookups(root: Path, sizes: tuple[int, ...] = (1_000, 10_000, 100_000)) -> dict[str, dict[str, float]]:
    """Seconds per look-up of a verified entry and of a missing one, in a folder of ``n`` files."""
    from flux_lora.data.cache import CacheStore

    out: dict[str, dict[str, float]] = {}
    src = next((root / "cache" / "latents").rglob("*.safetensors"))
    body = src.read_bytes()
    for n in sizes:
        folder = root / "lookup" / str(n)
        store = CacheStore(folder)
        sub = store.latent_path("00" + "0" * 62).parent
        sub.mkdir(parents=True, exist_ok=True)
        have = len(os.listdir(sub))
        for i in range(have, n):
            (sub / f"00{i:062d}.safetensors").write_bytes(body)
        keys = [f"00{i:062d}" for i in range(0, n, max(1, n // 1000))][:1000]
        for k in keys:  # verified once (read + checksum), as a plan does on its first look at an entry
            store.usable(store.latent_path(k))
        started = time.perf_counter()
        for _ in range(5):
            for k in keys:
                assert store.usable(store.latent_path(k))
        hit = (time.perf_counter() - started) / (5 * len(keys))
        started = time.perf_counter()
        for i in range(5 * len(keys)):
            assert not store.usable(store.latent_path(f"00{n + i:062d}"))
        miss = (time.perf_counter() - started) / (5 * len(keys))
        out[str(n)] = {"hit_us": hit * 1e6, "miss_us": miss * 1e6}
    return out


def _never() -> Any:
    raise AssertionError("no encoder may load: the cache is complete")


def _child(root: Path, what: str, profile: str | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--dir", str(root), "--child", what] + (["--profile", profile] if profile else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="work folder (data, model, cache); not committed")
    parser.add_argument("--count", type=int, default=100_000, help="images to generate")
    parser.add_argument("--profile", help="write a cProfile of the cached scan + plan here")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--no-fill",
        action="store_true",
        help="no fill: measure the cache as it is (without entries, the plan finds every entry missing)",
    )
    parser.add_argument(
        "--write-entries",
        action="store_true",
        help="complete the cache with entries of the right shapes written by the cache's writer instead of the "
        "tiny encoders' fill (see write_entries)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    root = args.dir.resolve()
    if args.child == "fill":
        print(json.dumps(fill(root)))
        return
    if args.child == "write":
        print(json.dumps(write_entries(root)))
        return
    if args.child == "measure":
        print(json.dumps(measure(root, args.profile)))
        return
    if args.child == "traced":
        print(json.dumps(traced(root)))
        return
    result: dict[str, Any] = {
        "count": args.count,
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_1min": os.getloadavg()[0],
    }
    result["generate_s"] = generate(root / "data", args.count)
    if not (root / "model").is_dir():
        from flux_lora.weights.tiny import write_tiny_model

        write_tiny_model(root / "model", variant="dev", seed=0)
    if args.write_entries:
        result["write_entries"] = _child(root, "write", None)
    elif not args.no_fill:
        result["fill"] = _child(root, "fill", None)
    # the first measure after the fill still reads what the fill's own scan and plan could not record
    result["first_after_fill"] = _child(root, "measure", None)
    result["cached"] = _child(root, "measure", args.profile)
    result["traced"] = _child(root, "traced", None)
    if next((root / "cache" / "latents").rglob("*.safetensors"), None) is not None:
        result["lookup"] = lookups(root)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
