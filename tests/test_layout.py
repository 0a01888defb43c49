"""The package's house rules, checked on the source: imports run one way between the folders, no import cycle,
no package import hidden inside a function, and files written by the previous (flat) layout still load."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).parents[1] / "flux_lora"
FIXTURES = Path(__file__).parent / "fixtures" / "v0"

# Lower layers never import higher ones; folders of one layer never import each other. The top-level modules
# (config, config_io, dtypes, sampling, atomic) are the base every folder may use; cli/ holds the programs;
# __init__ is the public API.
LAYERS = {
    "base": 0,
    "model": 1,
    "weights": 2,
    "data": 3,
    "lora": 3,
    "inference": 3,
    "training": 4,
    "toy": 5,  # the demo: may use training (its model trainer, later), like the programs
    "cli": 5,
    "api": 6,
    "ui": 6,  # the web UI: runs the programs as child processes, reads their outputs
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if module == "flux_lora":
        return "api"
    if len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").is_file():
        return "base"
    return parts[1]


def _imports(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """(package modules imported at module level, (line, module) of package imports inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    top: list[str] = []
    nested: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("flux_lora"):
                names = [child.module]
                names += [f"{child.module}.{a.name}" for a in child.names if _is_module(f"{child.module}.{a.name}")]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names if a.name.startswith("flux_lora")]
            for name in names:
                (nested.append((child.lineno, name)) if in_function else top.append(name))
            func = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, in_function or func)

    visit(tree, False)
    return top, nested


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        top, _ = _imports(path)
        graph[_module_name(path)] = {m for m in top if _is_module(m) and m != "flux_lora"}
    return graph


def _against_the_order(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a lower or sibling folder's module into a higher one's, as ``a (room) imports b (room)``."""
    bad = []
    for module, imported in graph.items():
        room = _room(module)
        for target in imported:
            other = _room(target)
            if other != room and LAYERS[other] >= LAYERS[room]:
                bad.append(f"{module} ({room}) imports {target} ({other})")
    return bad


def test_imports_run_one_way_between_folders():
    bad = _against_the_order(_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        state[node], _ = 2, stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


# The one deliberate exception: the training program imports the trainer (torch, Lightning: seconds) only after
# --help, usage and config errors have had their answer (tests/test_config_cli.py checks that they import no torch).
# Likewise the web UI imports Gradio (seconds) only after its arguments and host/token checks have answered.
DEFERRED = {
    ("flux_lora/cli/train.py", "flux_lora.training"),
    ("flux_lora/cli/train.py", "flux_lora.data.cache"),
    ("flux_lora/ui/server.py", "flux_lora.ui.app"),
}


def test_no_package_import_inside_functions():
    nested = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in _imports(path)[1]
        if not any(str(path.relative_to(PACKAGE.parent)) == f and name.startswith(m) for f, m in DEFERRED)
    ]
    assert not nested, "package imports inside functions (move them to the top):\n" + "\n".join(nested)


def test_layer_rules_catch_an_upward_import():
    """The checker itself, on a made-up graph: model importing training, and lora importing inference (siblings),
    are reported; training importing model and config is not."""
    graph = {
        "flux_lora.model.flux": {"flux_lora.training.module"},
        "flux_lora.lora.files": {"flux_lora.inference.pipeline"},
        "flux_lora.training.module": {"flux_lora.model.flux", "flux_lora.config"},
    }
    assert _against_the_order(graph) == [
        "flux_lora.model.flux (model) imports flux_lora.training.module (training)",
        "flux_lora.lora.files (lora) imports flux_lora.inference.pipeline (inference)",
    ]


def test_lora_file_of_the_previous_layout_loads():
    from flux_lora.lora.files import read_lora
    from flux_lora.model.flux import PRESETS

    lora = read_lora(FIXTURES / "lora_kohya.safetensors", PRESETS["tiny"])
    assert len(lora) == 26  # rank-8 adapters on every Linear of the tiny model's two blocks
    assert all(w.rank == 8 and w.alpha == 8.0 and torch.isfinite(w.delta()).all() for w in lora.values())
    assert any(w.delta().abs().max() > 0 for w in lora.values())  # trained, not the zero init


def test_checkpoint_of_the_previous_layout_resumes(tmp_path):
    """A Lightning checkpoint written before the move restores into today's module: same adapter names."""
    from flux_lora.config import LoraConfig, TrainConfig
    from flux_lora.training.module import FluxLoraModule
    from flux_lora.weights.loading import load_flow_model
    from flux_lora.weights.tiny import write_tiny_model

    ckpt = torch.load(FIXTURES / "step000010.ckpt", weights_only=True, map_location="cpu")
    folder = write_tiny_model(tmp_path / "tiny", variant="dev")
    module = FluxLoraModule(
        lambda device: load_flow_model(folder, dtype=torch.float32, quantize="float8_e4m3fn"),
        LoraConfig(rank=8, alpha=8.0),
        TrainConfig(),
    )
    module.configure_model()
    module.on_load_checkpoint(ckpt)  # raises when an adapter is missing
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    assert not unexpected
    assert {k for k in ckpt["state_dict"]} <= {k for k, _ in module.state_dict().items()}
    loaded = module.state_dict()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(loaded[key], value), key
    assert ckpt["global_step"] == 10


def test_cache_entries_of_the_previous_layout_are_found(tmp_path):
    """The content keys did not move: with the encoder identities the previous layout recorded (its tiny model's
    fingerprints), planning the example data gives exactly the entries that layout wrote, so a run after the
    upgrade encodes nothing."""
    import json

    from flux_lora.config import load_config
    from flux_lora.data.cache import AutoEncoderSpec, TextEncoderSpec, plan_cache
    from flux_lora.data.scan import scan

    root = Path(__file__).parents[1]
    cfg = load_config(root / "configs/tiny.yaml", [f"--data.cache_dir={tmp_path / 'cache'}"])
    cfg.data.source = str(root / "examples/data")
    specs = json.loads((FIXTURES / "encoder_specs.json").read_text())
    plan = plan_cache(
        scan(cfg.data),
        cfg.data,
        TextEncoderSpec(*specs["text"]),
        AutoEncoderSpec(*specs["ae"]),
        sample_prompts=cfg.sample.prompts,
    )
    store = plan.store
    planned = {store.text_path(k) for k in plan.text_keys.values()}
    planned |= {store.latent_path(job.key) for jobs in plan.variants for job in jobs}
    expected = set((FIXTURES / "cache_entries.txt").read_text().split())
    assert {str(p.relative_to(store.root)) for p in planned} == expected


def test_public_api_names_exist_and_the_readme_uses_them():
    import re

    import flux_lora

    assert all(hasattr(flux_lora, name) for name in flux_lora.__all__)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    used = {n.strip() for m in re.findall(r"^from flux_lora import (.+)$", readme, re.M) for n in m.split(",")}
    assert used and used <= set(flux_lora.__all__), used - set(flux_lora.__all__)
