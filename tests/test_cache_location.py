"""The cache lives under the run's output folder unless data.cache_dir says otherwise: training on other images
with another --output_dir does not cache into the shipped config's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux_lora.config import ExperimentConfig, load_config

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_the_cache_follows_the_output_folder(tmp_path, config):
    cfg = load_config(config, [f"--output_dir={tmp_path / 'mine'}"])
    assert Path(cfg.data.cache_dir) == tmp_path / "mine" / "cache"
    assert all(Path(d.cache_dir) == tmp_path / "mine" / "cache" for d in cfg.data.dataset_configs())


def test_a_cache_dir_that_is_set_is_kept(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"--data.cache_dir={tmp_path / 'shared'}"])
    assert Path(cfg.data.cache_dir) == tmp_path / "shared"
    assert Path(ExperimentConfig().data.cache_dir) == Path("outputs/flux-lora/cache")
