"""Several processes through Lightning's own DDP strategy (gloo on the CPU): different samples per rank,
identical adapters after every step, one cache fill."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_two_process_ddp(tmp_path, tiny_dev_dir):
    out = tmp_path / "records"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "tests/ddp_worker.py"),
        str(out),
        f"--model.source={tiny_dev_dir}",
        f"--output_dir={tmp_path / 'run'}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--data.source={ROOT / 'examples/data'}",
        "--train.accelerator=cpu",
        "--train.devices=2",
        "--train.strategy=ddp",
        "--max_steps=3",
        "--sample.prompts=[]",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
        "--data.batch_size=1",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["pid"] != r1["pid"]
    # each rank trains on its own samples...
    assert len(r0["captions"]) == len(r1["captions"]) == 3
    for a, b in zip(r0["captions"], r1["captions"], strict=True):
        assert set(a).isdisjoint(b)
    # ...and the adapters stay identical across ranks after every optimizer step (gradients are all-reduced)
    assert r0["digests"] == r1["digests"] and len(set(r0["digests"])) == 3
    # the cache is filled once, by rank 0; rank 1 loads no encoder and no temporary file is left behind
    assert r0["loads"]["text"] == 1 and r0["loads"]["ae"] == 1
    assert r1["loads"] == {"text": 0, "ae": 0}
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    assert (tmp_path / "run" / "tiny.safetensors").is_file()
