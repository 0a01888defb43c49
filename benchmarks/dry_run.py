"""A full-size dry run on the CPU: write a random FLUX.1-dev folder, train 2 steps with the shipped dev config,
generate one image with block offload and the trained LoRA; wall time and peak resident memory per phase.

    python benchmarks/dry_run.py WORKDIR [--preset flux-dev|medium|tiny] [--keep]

Writes WORKDIR/model (official layout: the DiT streamed to disk block by block in bf16, 23.8 GB at full size; the
full autoencoder; CLIP-L and T5-XXL at full width but 2 and 1 layers), WORKDIR/data (4 captioned images), runs
``train.py --config configs/flux-dev_lora-r16_fp8.yaml`` and ``examples/generate.py`` as children, and writes
WORKDIR/dry_run.json and WORKDIR/dry_run.md. Memory is polled from /proc every 0.2 s over each child's process
tree; the phases of training are told apart by its log lines. Exits 1 if a child fails. ``--keep`` keeps the
model folder (by default it is deleted at the end: 25 GB at full size). ``medium`` has FLUX.1-dev's widths with
1 + 1 blocks (1.1 GB DiT); ``tiny`` is the tests' tiny model. The full size needs ~27 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.proc_memory import FIELDS, PeakSampler, tree_memory  # noqa: E402
from flux_lora.atomic import write_atomic, write_text_atomic  # noqa: E402
from flux_lora.model.autoencoder import AE_PRESETS  # noqa: E402
from flux_lora.model.flux import PRESETS, FluxParams  # noqa: E402
from flux_lora.weights.loading import PARAMS_METADATA_KEY  # noqa: E402
from flux_lora.weights.streamed import write_random_dit  # noqa: E402
from flux_lora.weights.tiny import build_text_encoders, write_autoencoder  # noqa: E402

log = logging.getLogger("dry_run")
CONFIG = "configs/flux-dev_lora-r16_fp8.yaml"
LORA_NAME = "flux-dev-lora"  # the config's name
PROMPT = "a photo of sks dog"

# preset -> (DiT params, autoencoder preset, full-width text encoders)
DRY_PRESETS: dict[str, tuple[FluxParams, str, bool]] = {
    "flux-dev": (PRESETS["flux-dev"], "flux", True),
    "medium": (replace(PRESETS["flux-dev"], depth=1, depth_single_blocks=1), "flux", True),
    "tiny": (PRESETS["tiny"], "tiny", False),
}

# training phases, each starting at the first log line matching its pattern (in this order)
TRAIN_PHASES = (
    ("cache", r"flux_lora\.data\.cache: cache .* to encode"),
    ("load + quantize + LoRA", r"flux_lora\.data\.cache: cache .* encoded"),
    ("steps", r"flux_lora\.training\.console: training "),
    ("save", r"flux_lora\.training\.callbacks: saving the step"),
    ("exit", r"flux_lora\.training\.run: trained "),
)
GENERATE_PHASES = (("denoise", r"applied LoRA"), ("decode + write", r"denoising: 100%"))


def write_model(out: Path, preset: str) -> None:
    """The model folder in the official layout; full-size FLUX.1-dev without params metadata, like the real file
    (the loader infers the architecture from the shapes)."""
    params, ae, full_width = DRY_PRESETS[preset]
    metadata = {} if preset == "flux-dev" else {PARAMS_METADATA_KEY: json.dumps(params.to_dict())}
    write_random_dit(out / "flux1-dev.safetensors", params, metadata={"format": "pt", **metadata})
    write_autoencoder(out / "ae.safetensors", AE_PRESETS[ae], seed=0)
    build_text_encoders(out, params, seed=0, full_width=full_width, t5_layers=1 if full_width else 2)


def write_dataset(out: Path, n: int = 4, size: int = 320) -> None:
    """``n`` smooth random pictures with captions."""
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        write_atomic(out / f"{i:02d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
        write_text_atomic(out / f"{i:02d}.txt", f"{PROMPT}, picture {i}")


def train_command(work: Path) -> list[str]:
    return [
        *(sys.executable, "train.py", "--config", CONFIG),
        *("--model.source", str(work / "model"), "--model.quantize", "float8_e4m3fn"),
        *("--data.source", str(work / "data"), "--data.resolution", "256", "--data.cache_dir", str(work / "cache")),
        *("--train.max_steps", "2", "--train.log_every_n_steps", "1", "--output_dir", str(work / "train")),
        *("--sample.prompts", "[]"),
    ]


def generate_command(work: Path) -> list[str]:
    return [
        *(sys.executable, "examples/generate.py", "--model", str(work / "model"), "--prompt", PROMPT),
        *("--lora", str(work / "train" / f"{LORA_NAME}.safetensors"), "--quantize", "float8_e4m3fn"),
        *("--offload", "block", "--height", "256", "--width", "256", "--steps", "2", "--seed", "0"),
        *("--output", str(work / "generated.png"), "--overwrite"),
    ]


def run_child(cmd: list[str], logfile: Path, first: str, phases: tuple[tuple[str, str], ...] = ()) -> dict:
    """Run ``cmd`` from the repository root, its output teed to ``logfile``; wall time and peak memory per phase."""
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines as they happen: they mark the phases
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PeakSampler(lambda: tree_memory(proc.pid)).start()
    sampler.phase, starts, todo = first, {first: 0.0}, list(phases)
    with open(logfile, "w", buffering=1) as f:
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if todo and re.search(todo[0][1], line):
                sampler.sample()  # the previous phase's last sample
                sampler.phase = todo.pop(0)[0]
                starts[sampler.phase] = time.monotonic() - started
    code = proc.wait()
    total = time.monotonic() - started
    sampler.stop()
    ends = [*list(starts.values())[1:], total]
    rows = {
        name: {"seconds": round(end - start, 1), **_gb(sampler.peaks.get(name, {}))}
        for (name, start), end in zip(starts.items(), ends, strict=True)
    }
    return {"command": " ".join(cmd), "exit_code": code, "seconds": round(total, 1), "phases": rows}


def _gb(peak: dict[str, int]) -> dict[str, float]:
    return {f"peak_{k}_GB": round(peak.get(k, 0) / 1e9, 2) for k in FIELDS}


def markdown(result: dict) -> str:
    head = ["phase", "s", *(f"peak {k} GB" for k in FIELDS)]
    lines = [f"Dry run, preset `{result['preset']}`: {result['command']}", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for child in ("write", "train", "generate"):
        for name, row in result.get(child, {}).get("phases", {}).items():
            values = [row["seconds"], *(row[f"peak_{k}_GB"] for k in FIELDS)]
            lines.append(f"| {child}: {name} | " + " | ".join(str(v) for v in values) + " |")
    lines += ["", *(f"- {k}: {v}" for k, v in result["files"].items())]
    return "\n".join(lines) + "\n"


def run_all(work: Path, preset: str) -> dict:
    """The three children in order (a later one only if the earlier succeeded), from a clean output."""
    for old in ("train", "cache", "model", "data"):
        shutil.rmtree(work / old, ignore_errors=True)  # a previous run's would resume, or skip the cache
    (work / "generated.png").unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    # in a child of its own, measured like the others, so its memory is returned before training starts
    writer = [sys.executable, "benchmarks/dry_run.py", str(work), "--preset", preset, "--write-only"]
    children = [
        ("write", writer, "write model", ()),
        ("train", train_command(work), "startup", TRAIN_PHASES),
        ("generate", generate_command(work), "load", GENERATE_PHASES),
    ]
    result: dict = {}
    for name, cmd, first, phases in children:
        result[name] = run_child(cmd, work / f"{name}.log", first, phases)
        if result[name]["exit_code"] != 0:
            log.error("%s failed (exit status %s): see %s", name, result[name]["exit_code"], work / f"{name}.log")
            break
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--preset", choices=sorted(DRY_PRESETS), default="flux-dev")
    p.add_argument("--keep", action="store_true", help="keep the model folder afterwards")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)  # the first child
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.workdir.resolve()
    if args.write_only:
        write_model(work / "model", args.preset)
        write_dataset(work / "data")
        return 0
    command = " ".join(["python benchmarks/dry_run.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"preset": args.preset, "command": command, **run_all(work, args.preset)}
    result["files"] = _file_sizes(work)
    write_text_atomic(work / "dry_run.json", json.dumps(result, indent=2))
    write_text_atomic(work / "dry_run.md", markdown(result))
    print(markdown(result))
    if not args.keep:
        shutil.rmtree(work / "model", ignore_errors=True)
    ok = all(result.get(c, {}).get("exit_code") == 0 for c in ("write", "train", "generate"))
    return 0 if ok else 1


def _file_sizes(work: Path) -> dict[str, str]:
    def size(path: Path) -> str:
        files = [path] if path.is_file() else list(path.rglob("*")) if path.is_dir() else []
        return f"{sum(f.stat().st_size for f in files if f.is_file()) / 1e6:.1f} MB"

    return {
        "DiT file": size(work / "model" / "flux1-dev.safetensors"),
        "LoRA": size(work / "train" / f"{LORA_NAME}.safetensors"),
        "checkpoints": size(work / "train" / "checkpoints"),
        "image": size(work / "generated.png"),
    }


if __name__ == "__main__":
    sys.exit(main())
