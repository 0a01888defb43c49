"""The command line: --help lists every field, --print-config round-trips, lists never split on commas, errors
say where the bad value came from and point other trainers' names at ours."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import train
from flux_lora.config import ExperimentConfig, load_config
from flux_lora.config_io import ConfigError, field_docs


def test_every_field_has_a_description():
    rows = field_docs(ExperimentConfig)
    assert len(rows) > 60
    assert [path for path, _, _, doc in rows if not doc.strip()] == []


def test_help_mentions_every_field_with_type_default_and_description(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for path, tname, _, doc in field_docs(ExperimentConfig):
        assert f"--{path} {tname}" in out
        assert doc in " ".join(out.split())
    assert "--lora.rank int\n      LoRA rank of every adapted Linear (default: 16)" in out
    assert "--print-config" in out


def test_print_config_round_trips_through_config(tmp_path, capsys):
    argv = ["--config", "configs/tiny.yaml", "--lora.rank", "4", "--sample.prompts", "a cat, sitting", "--print-config"]
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    again = load_config(tmp_path / "resolved.yaml")
    assert again == load_config("configs/tiny.yaml", argv[2:-1])
    assert again.lora.rank == 4 and again.sample.prompts == ["a cat, sitting"]
    assert yaml.safe_load(printed)["model"]["source"] == "models/tiny-flux-dev"


def test_a_comma_in_a_prompt_survives_the_command_line():
    cfg = load_config(overrides=["--sample.prompts", "a photo of sks dog, on the beach, 35mm"])
    assert cfg.sample.prompts == ["a photo of sks dog, on the beach, 35mm"]
    cfg = load_config(overrides=["--sample.prompts", "a, b", "--sample.prompts=c"])
    assert cfg.sample.prompts == ["a, b", "c"]
    cfg = load_config(overrides=["--sample.prompts", '["one, two", "three"]'])
    assert cfg.sample.prompts == ["one, two", "three"]
    cfg = load_config(overrides=["--lora.targets", "[double_blocks.*, single_blocks.0.*]"])
    assert cfg.lora.targets == ["double_blocks.*", "single_blocks.0.*"]


def test_a_list_in_yaml_given_as_text_is_one_item(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sample:\n  prompts: a red circle, on white\n")
    assert load_config(path).sample.prompts == ["a red circle, on white"]


def test_resolution_list_from_the_command_line():
    assert load_config(overrides=["--data.resolution", "[512, 768]"]).data.resolution == [512, 768]
    assert load_config(overrides=["--resolution", "512", "--resolution", "768"]).data.resolution == [512, 768]
    assert load_config(overrides=["--resolution", "512"]).data.resolution == 512


def test_a_single_value_field_given_twice_keeps_the_last():
    assert load_config(overrides=["--lora.rank", "4", "--lora.rank", "8"]).lora.rank == 8


def test_command_line_errors_are_the_command_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"^command line: lora.rank: expected a number, got 'x'"):
        load_config(path, ["--lora.rank", "x"])
    with pytest.raises(ConfigError, match=r"^command line: lora: lora.rank must be >= 1, got 0"):
        load_config(path, ["--lora.rank", "0"])
    path.write_text("lora:\n  rank: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: lora: lora.rank must be >= 1"):
        load_config(path, ["--lora.alpha", "4"])


@pytest.mark.parametrize(
    ("yaml_text", "pointer"),
    [
        ("lora:\n  network_dim: 32\n", "'network_dim' is another trainer's name: use lora.rank"),
        ("lora:\n  network_alpha: 16\n", "use lora.alpha"),
        ("trigger_word: sks\n", "use data.trigger_word"),
        ("resolution: 512\n", "use data.resolution"),
        ("train:\n  lr_scheduler: cosine_with_min_lr\n", "use cosine with train.min_lr_ratio"),
        ("train:\n  optimizer: AdamW9bit\n", "'AdamW9bit' is unknown: use one of adamw, adam, sgd, adamw8bit"),
    ],
)
def test_names_from_other_trainers_point_at_ours(tmp_path, yaml_text, pointer):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert pointer in str(e.value) and "\n" not in str(e.value)


def test_foreign_names_on_the_command_line():
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'network_dim'.*use lora.rank"):
        load_config(overrides=["--network_dim", "32"])
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'lora.rnak'; did you mean 'lora.rank'"):
        load_config(overrides=["--lora.rnak", "32"])


def test_defaults_are_shown_as_they_load():
    cfg = ExperimentConfig()
    for path, _, default, _ in field_docs(ExperimentConfig):
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        derived = path == "data.cache_dir" and value == str(Path(cfg.output_dir) / "cache")  # help: "null: ..."
        assert value == default or dataclasses.is_dataclass(value) or derived, path


def test_readme_help_excerpt_is_real(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    excerpt = readme.split("## Every setting", 1)[1].split("```", 2)[1]
    with pytest.raises(SystemExit):
        train.main(["--help"])
    lines = set(capsys.readouterr().out.splitlines())
    assert [line for line in excerpt.strip().splitlines() if line not in lines] == []


@pytest.mark.parametrize("override", [["--output_dir", "x"], ["--name", "y"], ["--lora.rank", "8"]])
def test_an_unknown_yaml_key_is_the_files_whatever_the_command_line(tmp_path, override):
    path = tmp_path / "c.yaml"
    path.write_text("foo: 1\nlora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'foo'"):
        load_config(path, override)


def test_a_config_folder_is_called_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path} is a directory, not a YAML file"):
        load_config(tmp_path)


def test_another_trainers_name_gives_the_hint_first_and_a_pointer_to_help(caplog):
    assert train.main(["--network_dim", "8"]) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith(
        "command line: unknown key 'network_dim' ('network_dim' is another trainer's name: use lora.rank)"
    )
    assert "--help" in line and len(line) < 200, line


def _run_python(code: str) -> str:
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "argv", [["--help"], ["--network_dim", "8"], ["--lora.rnak", "4"], ["--config", "configs/nothing.yaml"]]
)
def test_help_and_usage_errors_import_no_torch(argv):
    """The first minute: --help, unknown keys and a missing file answer without importing torch or Lightning."""
    out = _run_python(
        "import runpy, sys\n"
        f"sys.argv = ['train.py', *{argv!r}]\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'safetensors', 'transformers') if m in sys.modules)\n"
        "print('CODE', code, 'HEAVY', heavy)\n"
    )
    last = out.strip().splitlines()[-1]
    code = 0 if argv == ["--help"] else 2
    assert last == f"CODE {code} HEAVY []", out[-2000:]


def test_usage_line_shows_the_config_fields_form(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "[--section.field VALUE ...]" in out.split("\n\n", 1)[0]
