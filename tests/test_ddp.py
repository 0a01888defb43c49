"""Several processes through Lightning's own DDP strategy (gloo on the CPU), with an fp8 base and LoRA dropout:
different samples per rank, identical adapters after every step, one cache fill shared by the ranks, exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]


def _ddp(tmp_path: Path, model_dir: Path, records: Path, run: str, max_steps: int, *extra: str) -> None:
    records.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "tests/ddp_worker.py"),
        str(records),
        f"--model.source={model_dir}",
        f"--output_dir={tmp_path / run}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--data.source={ROOT / 'examples/data'}",
        "--train.accelerator=cpu",
        "--train.devices=2",
        "--train.strategy=ddp",
        f"--max_steps={max_steps}",
        "--sample.prompts=[]",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
        "--train.lr_scheduler=constant",  # the same schedule for a run of 2 then 3 steps as for 3 straight
        "--data.batch_size=1",
        "--quantize=float8_e4m3fn",
        "--lora.dropout=0.2",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp_fp8_with_exact_resume(tmp_path, tiny_dev_dir):
    out = tmp_path / "records"
    _ddp(tmp_path, tiny_dev_dir, out, "run", 3)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["pid"] != r1["pid"]
    # each rank trains on its own samples...
    assert len(r0["captions"]) == len(r1["captions"]) == 3
    for a, b in zip(r0["captions"], r1["captions"], strict=True):
        assert set(a).isdisjoint(b)
    # ...and the adapters stay identical across ranks after every optimizer step (gradients are all-reduced)
    assert r0["digests"] == r1["digests"] and len(set(r0["digests"])) == 3
    # the cache is filled once, each rank encoding its share and loading only the encoders its share needs;
    # no temporary file is left behind
    assert sum(r["fill"]["texts"] for r in (r0, r1)) == 9 and sum(r["fill"]["latents"] for r in (r0, r1)) == 8
    for r in (r0, r1):
        assert r["loads"] == {"text": int(r["fill"]["texts"] > 0), "ae": int(r["fill"]["latents"] > 0)}
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    assert (tmp_path / "run" / "tiny.safetensors").is_file()

    # 2 steps, then the same command with max_steps 3: each rank's dropout RNG comes back, so the LoRA is exact
    _ddp(tmp_path, tiny_dev_dir, tmp_path / "records-b", "run-b", 2)
    _ddp(tmp_path, tiny_dev_dir, tmp_path / "records-c", "run-b", 3)
    resumed = json.loads((tmp_path / "records-c" / "rank0.json").read_text())
    assert resumed["digests"] == r0["digests"][2:]
    a, b = (load_file(tmp_path / run / "tiny.safetensors") for run in ("run", "run-b"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_two_process_ddp_with_output_preservation(tmp_path, tiny_dev_dir):
    """Output preservation's extra passes (the base one with adapters off, no gradient) keep the ranks' adapters
    identical after every step, on the fp8 base."""
    extra = ("--preservation.output_weight=0.5", '--preservation.prompts=["a red square", "a blue circle"]')
    _ddp(tmp_path, tiny_dev_dir, tmp_path / "records", "run", 2, *extra)
    r0, r1 = (json.loads((tmp_path / "records" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["digests"] == r1["digests"] and len(set(r0["digests"])) == 2


def test_two_process_ddp_on_kontext_pairs(tmp_path):
    """Kontext pairs under DDP: the ranks fill the targets' and the references' cache entries in shares (every
    reference encoded by exactly one rank), each rank trains on its own pairs, the adapters stay identical."""
    from flux_lora.toy.pairs import write_pairs
    from flux_lora.weights.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "kontext", variant="kontext", seed=2)
    targets, references = write_pairs(tmp_path / "pairs", 4, seed=7, size=32)
    extra = (
        f"--data.source={targets}",
        f"--data.references={references}",
        "--data.resolution=32",
        "--quantize=null",
        "--lora.dropout=0.0",
    )
    _ddp(tmp_path, model, tmp_path / "records", "run", 2, *extra)
    r0, r1 = (json.loads((tmp_path / "records" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["digests"] == r1["digests"] and len(set(r0["digests"])) == 2
    assert (
        len(r0["captions"]) == len(r1["captions"]) == 2
    )  # every pair says "make it pink": no caption tells them apart
    latents = [p for p in (tmp_path / "cache" / "latents").rglob("*.safetensors")]
    assert len(latents) == 8, latents  # 4 targets and 4 references, each its own entry
    assert sum(r["fill"]["latents"] for r in (r0, r1)) == 4  # the targets' share; the references' fill comes after
    assert (tmp_path / "run" / "tiny.safetensors").is_file()
