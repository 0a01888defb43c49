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
