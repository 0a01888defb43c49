"""The benchmarks time the trainer's step: the same loss as FluxLoraModule, the peer on the same objective, and
benchmark modules wired without cycles or private cross-imports."""

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from benchmarks import bench_cpu as B
from benchmarks.common import empty_embedding, make_batch, shipped_loss
from benchmarks.gpu_models import peer_loss
from flux_lora.config import LoraConfig, load_config
from flux_lora.model.flux import PRESETS, Flux
from flux_lora.training.module import FluxLoraModule
from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
P = PRESETS["tiny"]
# the shipped objective with every option away from its default, so each one takes part
CFG = dataclasses.replace(B.CFG, caption_dropout=0.5, loss_weighting="cosmap", guidance=3.5)


@pytest.fixture(scope="module")
def dit() -> Flux:
    torch.manual_seed(0)
    return Flux(P).eval()


@pytest.fixture(scope="module")
def inputs():
    return make_batch(P, 8, 6, 7, batch=2, dtype=torch.float32), empty_embedding(P, 7, dtype=torch.float32)


def test_benchmarks_use_the_shipped_experiments_objective():
    assert load_config(BENCHMARKS.parent / "configs/flux-dev_lora-r16_fp8.yaml").train == B.CFG
    assert B.CFG.shift == "flux" and B.CFG.caption_dropout > 0  # the two a hand-written step used to leave out


def test_benchmark_loss_is_the_modules_loss(dit, inputs):
    batch, empty = inputs
    module = FluxLoraModule(lambda device: copy.deepcopy(dit), LoraConfig(rank=2, alpha=2, init="gaussian"), CFG, empty)
    module.configure_model()
    for seed in (0, 1):
        with torch.no_grad():
            expected = module(batch, torch.Generator().manual_seed(seed))
            got = shipped_loss(module.dit, batch, CFG, empty, precision="32-true", seed=seed)
        assert torch.equal(got, expected)


def test_peer_loss_equals_ours_on_the_same_weights(dit, inputs):
    """diffusers' model holding our weights gives our loss: the peer is timed on the same objective."""
    diffusers = pytest.importorskip("diffusers")
    batch, empty = inputs
    ref = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(P)).eval()
    ref.load_state_dict(flux_to_diffusers(dit.state_dict(), P), strict=True)
    for seed in (0, 1):
        with torch.no_grad():
            ours = shipped_loss(dit, batch, CFG, empty, precision="32-true", seed=seed)
            peer = peer_loss(ref, batch, CFG, empty, precision="32-true", seed=seed, dtype=torch.float32)
        torch.testing.assert_close(peer, ours, rtol=1e-5, atol=0)


def _benchmark_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from benchmarks.x import name`` in ``path``, in functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
            out += [(f"benchmarks.{a.name}", "") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
            out += [(node.module, a.name) for a in node.names]
    return out


def test_benchmark_modules_import_no_private_names_and_form_no_cycle():
    graph = {f"benchmarks.{p.stem}": _benchmark_imports(p) for p in sorted(BENCHMARKS.glob("*.py"))}
    private = [f"{m} imports {t}.{n}" for m, imps in graph.items() for t, n in imps if n.startswith("_")]
    assert not private, "\n".join(private)
    edges = {m: {t for t, _ in imps} for m, imps in graph.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(t == goal or (t not in seen and reaches(t, goal, seen | {t})) for t in edges.get(start, ()))

    assert not [m for m in edges if reaches(m, m, {m})], "import cycle among the benchmark modules"
