"""benchmarks/toy_preservation.py without training: its rows are valid train.py overrides of configs/toy.yaml, and
its table shows concept and keep accuracy beside the base model's."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.toy_preservation import ROWS, Row, concept_scenes, parse_row, table
from flux_lora.config import load_config

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name", list(ROWS))
def test_rows_are_valid_overrides(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs/toy.yaml", ROWS[name])
    assert (cfg.preservation.enabled) == ("preservation" in name)
    assert len(cfg.data.dataset_configs()) == (1 if "pink only" in name else 2)


def test_row_syntax_and_table():
    assert parse_row("dora=--lora.kind=dora --lora.rank 8") == Row("dora", ["--lora.kind=dora", "--lora.rank", "8"])
    keep = {"shape": 0.89, "colour": 1.0, "position": 1.0, "size": 0.98}
    result = {
        "base": {"concept": 0.0, "keep": keep},
        "rows": [
            {"name": "r", "concept": 1.0, "keep": {**keep, "colour": 0.15}, "train_seconds": 33.2, "file_bytes": 528384}
        ],
    }
    lines = table(result).splitlines()
    assert lines[2] == "| base model (no LoRA) | 0 % | 89 % | 100 % | 100 % | 98 % | - | - |"
    assert lines[3] == "| r | 100 % | 89 % | 15 % | 100 % | 98 % | 33 s | 516 KiB |"
    assert len(concept_scenes()) == 18 and {s.colour for s in concept_scenes()} == {"pink"}


def test_grid_rows_are_the_issues_table_and_valid_overrides(monkeypatch, tmp_path):
    """benchmarks/toy_preservation_grid.py: 4 preservation x 3 kinds x 2 block sets, each a valid config; the
    table holds the rows measured so far."""
    from benchmarks import toy_preservation_grid as G

    monkeypatch.chdir(ROOT)
    rows = G.rows()
    assert len(rows) == len({r.name for r in rows}) == 4 * 3 * 2
    for row in rows:
        cfg = load_config(ROOT / "configs/toy.yaml", row.overrides)
        preservation, kind, blocks = row.name.split(" / ")
        assert cfg.lora.kind == kind.lower()
        assert cfg.preservation.enabled == (preservation in ("output preservation", "both"))
        assert any(d.generate for d in cfg.data.datasets) == (preservation in ("regularization images", "both"))
        assert (cfg.lora.double_blocks is None) == (blocks == "all blocks")
    assert G.table(tmp_path) == "no rows measured yet"
