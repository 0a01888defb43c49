"""Random ``kill -9`` against resume: every run killed at random moments and rerun until it exits 0 must end with
the LoRA files of a straight run, bit for bit.

The tiny config (8 images, batch 2: 4 steps an epoch) with checkpoints every 2 steps (so half of them at an
epoch's end), a LoRA every 2 steps, LoRA dropout, caption dropout, random crops and flips. A straight run gives the
reference files. Then runs in fresh output folders (sharing the straight run's filled cache) are each killed
``--kills-per-run`` times and rerun until exit 0; a kill lands at a random moment of the process's life, right after
a random checkpoint file appears, or right after the final step's checkpoint appears and before the final LoRA is
written. The final LoRA of every run must equal the straight run's; so must every intermediate LoRA it holds.

    nice -n 10 python tools/random_kill.py --kills 30

prints one summary line and exits 1 on any difference. Run 2026-12-07 on 2 CPU cores shared with other jobs
(16 min): "30 kills (checkpoint 7, final 6, random 17; 6 between the final checkpoint and the final LoRA) over 11
runs of 12 steps: 11/11 final LoRAs bit-exact, 55 intermediate LoRAs equal, 0 differences" (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"


@dataclass
class Tally:
    kills: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    in_final_window: int = 0  # kills after the final checkpoint with the final LoRA not yet written
    runs: int = 0
    exact: int = 0
    intermediates_equal: int = 0
    differences: list[str] = field(default_factory=list)


def train_command(model: Path, out: Path, cache: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        f"--model.source={model}",
        f"--output_dir={out}",
        f"--data.cache_dir={cache}",
        f"--data.source={ROOT / 'examples/data'}",
        "--sample.prompts=[]",
        "--train.accelerator=cpu",
        "--train.devices=1",
        f"--max_steps={steps}",
        "--train.checkpoint_every_n_steps=2",
        "--train.save_every_n_steps=2",
        "--train.log_every_n_steps=2",
        "--lora.dropout=0.1",
        "--caption_dropout=0.3",
        "--data.crop=random",
        "--data.flip=true",
        "--model.gradient_checkpointing=false",
    ]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_to_end(cmd: list[str], log: Path) -> float:
    started = time.monotonic()
    with open(log, "a") as f:
        code = subprocess.run(cmd, env=environment(), stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"random_kill: a run without kills exited {code}; see {log}")
    return time.monotonic() - started


def killed_run(cmd: list[str], out: Path, log: Path, mode: str, lifetime: float, steps: int, rng: random.Random):
    """Start ``cmd`` and SIGKILL it as ``mode`` says; return (exit code, whether the kill landed between the final
    checkpoint and the final LoRA)."""
    final_ckpt = out / "checkpoints" / f"step{steps:06d}.ckpt"
    before = {p.name for p in (out / "checkpoints").glob("*.ckpt")} if (out / "checkpoints").is_dir() else set()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, env=environment(), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + (rng.uniform(0.3, lifetime) if mode == "random" else 4 * lifetime)
        target = rng.choice([f"step{s:06d}.ckpt" for s in range(2, steps + 1, 2)]) if mode == "checkpoint" else None
        while proc.poll() is None and time.monotonic() < deadline:
            if mode == "final" and final_ckpt.exists():
                break
            if target and target not in before and (out / "checkpoints" / target).exists():
                break
            time.sleep(0.001)
        window = False
        if proc.poll() is None:
            window = mode == "final" and final_ckpt.exists() and not (out / f"{NAME}.safetensors").exists()
            proc.send_signal(signal.SIGKILL)
        return proc.wait(), window


def same(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="kills in all")
    parser.add_argument("--kills-per-run", type=int, default=3, help="kills before a run is left to finish")
    parser.add_argument("--steps", type=int, default=12, help="max_steps of every run (4 steps an epoch)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "random-kill", help="scratch folder")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work.resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    model, cache, log = work / "model", work / "cache", work / "log.txt"
    if not model.exists():
        sys.path.insert(0, str(ROOT))
        from flux_lora.weights.tiny import write_tiny_model

        write_tiny_model(model, variant="dev")
    straight = work / "runs" / "straight"
    run_to_end(train_command(model, straight, cache, args.steps), log)  # fills the cache too
    lifetime = run_to_end(train_command(model, work / "runs" / "timing", cache, args.steps), log)
    reference = {p.name: p for p in (straight / "lora").glob("*.safetensors")}

    tally = Tally()
    while tally.kills < args.kills:
        tally.runs += 1
        out = work / "runs" / f"run{tally.runs:02d}"
        cmd = train_command(model, out, cache, args.steps)
        for _ in range(min(args.kills_per_run, args.kills - tally.kills)):
            final_done = (out / "checkpoints" / f"step{args.steps:06d}.ckpt").exists()
            mode = rng.choice(["random", "random", "checkpoint"] + ([] if final_done else ["final"]))
            code, window = killed_run(cmd, out, log, mode, lifetime, args.steps, rng)
            if code == 0:  # finished before the kill: nothing more to kill in this run
                break
            tally.kills += 1
            tally.by_mode[mode] = tally.by_mode.get(mode, 0) + 1
            tally.in_final_window += window
        for _ in range(5):  # rerun until it exits 0
            with open(log, "a") as f:
                if subprocess.run(cmd, env=environment(), stdout=f, stderr=subprocess.STDOUT).returncode == 0:
                    break
        else:
            tally.differences.append(f"{out.name}: never exited 0")
            continue
        final = out / f"{NAME}.safetensors"
        if final.exists() and same(final, straight / f"{NAME}.safetensors"):
            tally.exact += 1
        else:
            tally.differences.append(f"{out.name}: final LoRA {'differs' if final.exists() else 'missing'}")
        for p in sorted((out / "lora").glob("*.safetensors")):
            if p.name in reference and same(p, reference[p.name]):
                tally.intermediates_equal += 1
            else:
                tally.differences.append(f"{out.name}: {p.name} differs from the straight run's")
    modes = ", ".join(f"{k} {v}" for k, v in sorted(tally.by_mode.items()))
    print(
        f"random_kill: {tally.kills} kills ({modes}; {tally.in_final_window} between the final checkpoint and the "
        f"final LoRA) over {tally.runs} runs of {args.steps} steps: {tally.exact}/{tally.runs} final LoRAs "
        f"bit-exact, {tally.intermediates_equal} intermediate LoRAs equal, {len(tally.differences)} differences"
        + (": " + "; ".join(tally.differences) if tally.differences else "")
    )
    return 1 if tally.differences or tally.exact != tally.runs else 0


if __name__ == "__main__":
    sys.exit(main())
