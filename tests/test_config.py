"""The experiment configuration: shipped configs load, overrides work, bad input names the key."""

from pathlib import Path

import pytest

from flux_lora.config import ExperimentConfig, load_config, save_config
from flux_lora.config_io import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "tiny.yaml",
        "flux-dev_lora-r16_fp8.yaml",
        "flux-schnell_lora-r16.yaml",
        "flux-dev_lora-lowmem.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig) and cfg.lora.rank >= 1
    # one source, or each of several datasets (a generated regularization set has prompts instead)
    entries = cfg.data.datasets
    assert all(d.source or d.generate for d in entries) if entries else cfg.data.source
    assert isinstance(cfg.train.learning_rate, float)


def test_dev_experiment_is_what_it_says():
    cfg = load_config(Path(__file__).parents[1] / "configs/flux-dev_lora-r16_fp8.yaml")
    assert cfg.model.quantize == "float8_e4m3fn" and cfg.lora.rank == 16 and cfg.data.resolution == 1024
    assert cfg.model.gradient_checkpointing and cfg.model.source == "AI-ModelScope/FLUX.1-dev"


def test_overrides_by_name_and_path(tmp_path):
    cfg = load_config(
        CONFIGS[0],
        [
            "--quantize",
            "float8_e4m3fn",
            "--train.learning_rate",
            "5e-5",
            "lora.rank=4",
            "--max_steps=7",
            "--sample.prompts",
            '["a: b", c]',
            "--data.default_caption",
            "a photo: of 5e-5",
        ],
    )
    assert cfg.model.quantize == "float8_e4m3fn"
    assert cfg.train.learning_rate == 5e-5 and cfg.lora.rank == 4 and cfg.train.max_steps == 7
    assert cfg.sample.prompts == ["a: b", "c"]
    assert cfg.data.default_caption == "a photo: of 5e-5"  # text fields take the text as is


def test_yaml_5e_minus_5_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: x}\ntrain:\n  learning_rate: 5e-5\n  gradient_clip: null\n")
    cfg = load_config(path)
    assert cfg.train.learning_rate == pytest.approx(5e-5) and cfg.train.gradient_clip is None


def test_unknown_keys_name_the_nearest_valid_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key train\.'learning_rat'; did you mean 'learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key 'lora.rnak'.*did you mean 'lora.rank'"):
        load_config(None, ["--lora.rnak", "4"])
    path.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(path)


def test_wrong_types_and_values(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps: expected a whole number, got 1.5"):
        load_config(None, ["--train.max_steps", "1.5"])
    with pytest.raises(ConfigError, match=r"model.quantize: 'int4' is not one of \['float8_e4m3fn'\]"):
        load_config(None, ["--quantize", "int4"])
    with pytest.raises(ConfigError, match="lora.rank must be >= 1, got 0"):
        load_config(None, ["--lora.rank", "0"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, ["--model.gradient_checkpointing", "maybe"])
    with pytest.raises(ConfigError, match="ambiguous"):
        load_config(None, ["--seed", "3"])  # data.seed and train.seed


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS[0], ["--max_steps", "3"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
