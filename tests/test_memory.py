"""Peak host memory while loading a checkpoint of >= 200 MB stays near one copy of the weights.

Each measurement runs in a fresh Python process and reads the kernel's peak resident set (VmHWM) after loading,
minus the resident set before it. A naive ``load_state_dict(load_file(...))`` is measured the same way as a
control: it holds two copies, so the bound below really separates the two."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_lora.model.flux import PRESETS, Flux

PARAMS = replace(
    PRESETS["flux-dev"], hidden_size=768, num_heads=6, depth=2, depth_single_blocks=2, vec_in_dim=64, context_in_dim=256
)

SCRIPT = r"""
import json, sys, threading, time, torch
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

anon = [status("RssAnon:"), 0]
def sample():  # the kernel keeps no high-water mark of anonymous memory: sample it
    while anon[1] == 0:
        anon[0] = max(anon[0], status("RssAnon:"))
        time.sleep(0.002)

from flux_lora.weights.loading import load_flow_model
from flux_lora.model.flux import Flux, FluxParams
from safetensors.torch import load_file
path, mode = Path(sys.argv[1]), sys.argv[2]
params = FluxParams.from_dict(json.loads(sys.argv[3]))
before, anon_before = status("VmRSS:"), status("RssAnon:")
threading.Thread(target=sample, daemon=True).start()
if mode == "ours":
    model = load_flow_model(path, dtype=torch.float32)
elif mode == "ours-fp8":
    model = load_flow_model(path, dtype=torch.float32, quantize="float8_e4m3fn")
else:
    model = Flux(params)
    model.load_state_dict(load_file(str(path)))
s = sum(int(p.detach().reshape(-1).view(torch.uint8)[::1024].sum()) for p in model.parameters())  # touch every page
anon[1] = 1
print(json.dumps({"peak": status("VmHWM:") - before, "anon": anon[0] - anon_before}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in Flux(PARAMS).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("big") / "flux1-dev.safetensors"
    save_file(sd, str(path), metadata={"flux_lora.params": json.dumps(PARAMS.to_dict())})
    assert path.stat().st_size >= 200e6
    return path


def _peak(path: Path, mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), mode, json.dumps(PARAMS.to_dict())],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_holds_one_copy(big_checkpoint):
    size = big_checkpoint.stat().st_size
    ours, naive = _peak(big_checkpoint, "ours")["peak"], _peak(big_checkpoint, "naive")["peak"]
    assert naive > 1.8 * size, f"control: naive load peaked at {naive / size:.2f}x the file"
    assert ours < 1.2 * size, f"streaming load peaked at {ours / size:.2f}x the file"


def test_quantized_loading_stays_under_the_float_size(big_checkpoint):
    """fp8 on load: the float32 file is mapped and read once (clean pages the kernel can drop); the memory only
    the model holds (anonymous) peaks near the fp8 weights, a quarter of the file, plus one tensor's temporaries."""
    size = big_checkpoint.stat().st_size
    m = _peak(big_checkpoint, "ours-fp8")
    assert m["peak"] < 1.5 * size, f"quantized load peaked at {m['peak'] / size:.2f}x the file"
    assert m["anon"] < 0.5 * size, f"anonymous memory peaked at {m['anon'] / size:.2f}x the file"
