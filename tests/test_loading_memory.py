"""Loading a DiT holds about the loaded model in memory, not the file too: resident memory of a process loading a
~290 MB bf16 checkpoint (FLUX's real head size and text widths, 1024 hidden, 2 + 4 blocks), measured from /proc.

Before the fix the file stayed memory-mapped while it was read (and, for tensors kept in the file's dtype, for as
long as the model lived), so every page read counted as the process's file-backed resident memory: at full size,
22.8 GB of a 23 GB machine for a 12 GB fp8 model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from flux_lora.model.flux import PRESETS
from flux_lora.weights.safetensors_io import read_shapes
from flux_lora.weights.streamed import write_random_dit

ROOT = Path(__file__).parents[1]
MB = 1 << 20
PARAMS = replace(PRESETS["flux-dev"], hidden_size=1024, num_heads=8, depth=2, depth_single_blocks=4)

# The child resets its peak-RSS mark (VmHWM) after its imports, loads, and reports /proc figures and what the
# model holds. A thread samples RssFile, which has no high-water mark of its own.
CHILD = """
import json, sys, time
import torch
from benchmarks.proc_memory import PeakSampler, status
from flux_lora.weights.loading import load_flow_model
torch.set_num_threads(1)
base = status()
open("/proc/self/clear_refs", "w").write("5")
sampler = PeakSampler(status, 0.002).start()
started = time.perf_counter()
model = load_flow_model(sys.argv[1], quantize="float8_e4m3fn", dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - started
sampler.stop()
end = status()
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(dict(base=base, end=end, peak=sampler.peaks["start"], held=held, seconds=seconds)))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_dit(tmp_path_factory.mktemp("medium") / "flux1-dev.safetensors", PARAMS)


def _load_in_child(path: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), dtype], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_loading_holds_the_model_not_the_file(checkpoint: Path, dtype: str) -> None:
    size = checkpoint.stat().st_size
    largest = max(2 * int(__import__("math").prod(s)) for s in read_shapes(checkpoint).values())  # bf16 bytes
    r = _load_in_child(checkpoint, dtype)
    growth = r["end"]["VmHWM"] - r["base"]["VmRSS"]
    # the model, two tensors in flight, allocator slack and code pages: 64 MB of slack failed once in CI (246 MB
    # against a 245 MB bound, bf16), so 128 MB; the mapped-file loading this guards against grew 418-468 MB
    bound = r["held"] + 2 * largest + 128 * MB
    print(
        f"{dtype}: file {size / MB:.0f} MB, model {r['held'] / MB:.0f} MB, largest tensor {largest / MB:.1f} MB, "
        f"peak RSS growth {growth / MB:.0f} MB (bound {bound / MB:.0f}), peak RssFile growth "
        f"{(r['peak']['RssFile'] - r['base']['RssFile']) / MB:.0f} MB, after loading "
        f"{(r['end']['RssFile'] - r['base']['RssFile']) / MB:.0f} MB, {r['seconds']:.2f} s"
    )
    assert growth <= bound, f"peak RSS grew {growth / MB:.0f} MB loading a {size / MB:.0f} MB file"
    assert r["peak"]["RssFile"] - r["base"]["RssFile"] < 16 * MB, "the checkpoint's pages were mapped while loading"
    assert r["end"]["RssFile"] - r["base"]["RssFile"] < 16 * MB, "the checkpoint stays mapped after loading"
