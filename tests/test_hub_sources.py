"""Model sources: one rule reads a source string; Hugging Face and ModelScope ids fetch exactly the files the
loader needs (through substituted download functions, never the network); errors are one line."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

import train
from flux_lora.config import load_config
from flux_lora.training.run import fetch_model_folder
from flux_lora.weights import hub
from flux_lora.weights.controlnet_loading import resolve_controlnet

BFL_REPO = [
    "flux1-dev.safetensors",
    "ae.safetensors",
    "model_index.json",
    "README.md",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "tokenizer/vocab.json",
    "tokenizer_2/spiece.model",
]
FUNCTIONS = {"huggingface": "_huggingface_download", "modelscope": "_modelscope_download"}
MODEL_PATTERNS = [
    "flux1-*.safetensors",
    "ae.safetensors",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
]


class FakeHub:
    """``snapshot_download`` over an in-memory file list: writes the files ``allow_patterns`` select (with
    fnmatch, as both libraries filter) into one snapshot folder and records every call."""

    def __init__(self, root: Path, files: list[str]):
        self.root, self.files, self.calls = root, files, []

    def __call__(self, repo_id: str, **kwargs) -> str:
        self.calls.append((repo_id, kwargs))
        folder = self.root / repo_id.replace("/", "--")
        for name in self.files:
            if any(fnmatch.fnmatch(name, p) for p in kwargs["allow_patterns"]):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(b"x")
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def fetched(self) -> list[str]:
        return sorted(str(p.relative_to(self.root).as_posix()) for p in self.root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("source", "hub_setting", "expected_hub", "repo"),
    [
        ("hf:black-forest-labs/FLUX.1-dev", "modelscope", "huggingface", "black-forest-labs/FLUX.1-dev"),
        ("black-forest-labs/FLUX.1-dev", "huggingface", "huggingface", "black-forest-labs/FLUX.1-dev"),
        ("ms:AI-ModelScope/FLUX.1-dev", "huggingface", "modelscope", "AI-ModelScope/FLUX.1-dev"),
        ("AI-ModelScope/FLUX.1-dev", "modelscope", "modelscope", "AI-ModelScope/FLUX.1-dev"),
    ],
)
def test_hub_ids_fetch_exactly_what_the_loader_reads(tmp_path, monkeypatch, source, hub_setting, expected_hub, repo):
    fake = FakeHub(tmp_path, BFL_REPO)
    other = "modelscope" if expected_hub == "huggingface" else "huggingface"
    monkeypatch.setattr(hub, FUNCTIONS[expected_hub], fake)
    monkeypatch.setattr(hub, FUNCTIONS[other], lambda *a, **k: pytest.fail(f"asked {other}"))
    folder = hub.resolve_model(source, hub=hub_setting, revision="main")
    assert [(r, k["allow_patterns"], k["revision"]) for r, k in fake.calls] == [(repo, MODEL_PATTERNS, "main")]
    assert "cache_dir" not in fake.calls[0][1]  # the library's own cache (HF_HOME / MODELSCOPE_CACHE)
    prefix = repo.replace("/", "--") + "/"
    wanted = [f for f in BFL_REPO if f.startswith(("text_encoder", "tokenizer", "flux1-", "ae."))]
    assert fake.fetched() == sorted(prefix + f for f in wanted)  # no diffusers copies, README or model_index
    assert folder == tmp_path / repo.replace("/", "--")


def test_a_diffusers_only_repository_fetches_transformer_and_vae(tmp_path):
    files = [f for f in BFL_REPO if f not in ("flux1-dev.safetensors", "ae.safetensors")]
    fake = FakeHub(tmp_path, files)
    hub.resolve_model("hf:someone/flux-finetune", download=fake)
    assert [k["allow_patterns"] for _, k in fake.calls] == [MODEL_PATTERNS, ["transformer/*", "vae/*"]]
    assert not any("README" in f or "model_index" in f for f in fake.fetched())


def test_controlnet_ids_on_hugging_face(tmp_path):
    fake = FakeHub(tmp_path, ["config.json", "diffusion_pytorch_model.safetensors", "images/demo.png"])
    for repo in (
        "InstantX/FLUX.1-dev-Controlnet-Union",
        "jasperai/Flux.1-dev-Controlnet-Upscaler",
        "alimama-creative/FLUX.1-dev-Controlnet-Inpainting-Beta",
    ):
        folder = resolve_controlnet(f"hf:{repo}", fake)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert {k["allow_patterns"] == ["*.json", "diffusion_pytorch_model*.safetensors"] for _, k in fake.calls} == {True}


class GatedRepoError(OSError):
    """Stands in for huggingface_hub's error of that name (classified by class name, as the real one is)."""


def test_gated_error_is_one_line_and_says_what_to_do():
    def gated(repo_id, **kwargs):
        raise GatedRepoError(
            "401 Client Error.\n\nCannot access gated repo for url https://huggingface.co/api/...\nAccess to "
            "model black-forest-labs/FLUX.1-dev is restricted. You must have access to it and be authenticated."
        )

    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model("hf:black-forest-labs/FLUX.1-dev", download=gated)
    msg = str(e.value)
    assert "\n" not in msg
    assert "accept its licence on https://huggingface.co/black-forest-labs/FLUX.1-dev" in msg
    assert "huggingface-cli login" in msg and "--model.source /path" in msg and "--model /path" not in msg


def test_offline_error_is_one_line():
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache\nand outgoing traffic is off.")

    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model("black-forest-labs/FLUX.1-dev", hub="huggingface", download=offline)
    msg = str(e.value)
    assert "\n" not in msg and "offline and not in the download cache" in msg and "--model.source" in msg
    assert "(nor is black-forest-labs/FLUX.1-dev a local folder)" in msg


@pytest.mark.parametrize("source", ["models/x", "./flux", "~/no/such/flux", "/no/such/flux", "a/b/c", "x.safetensors"])
def test_a_missing_path_is_an_error_naming_it_without_any_download(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    calls = []
    for name in FUNCTIONS.values():
        monkeypatch.setattr(hub, name, lambda *a, **k: calls.append(a))
    with pytest.raises(hub.ModelNotFoundError, match=rf"^{source}: no such folder or file"):
        hub.resolve_model(source)
    with pytest.raises(hub.ModelNotFoundError, match=rf"^{source}: no such folder or file"):
        hub.resolve_model(source, download=lambda *a, **k: calls.append(a))
    assert calls == []


def test_parse_source_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "flux").mkdir(parents=True)
    assert hub.parse_source("local/flux") == hub.Source("local", "local/flux")
    assert hub.parse_source("owner/name") == hub.Source(hub.DEFAULT_HUB, "owner/name")
    assert hub.parse_source("owner/name", "huggingface") == hub.Source("huggingface", "owner/name")
    assert hub.parse_source("hf:owner/name") == hub.Source("huggingface", "owner/name")
    with pytest.raises(hub.ModelNotFoundError, match="^hf:owner: a huggingface repository id is owner/name"):
        hub.parse_source("hf:owner")


def test_training_uses_model_hub_and_revision(tmp_path, monkeypatch, tiny_dev_dir):
    calls = []

    def download(repo_id, **kwargs):
        calls.append((repo_id, kwargs["revision"]))
        return str(tiny_dev_dir)

    monkeypatch.setattr(hub, "_huggingface_download", download)
    cfg = load_config(overrides=["--model.source", "owner/flux", "--model.hub", "huggingface", "--revision", "v1"])
    assert fetch_model_folder(cfg) == tiny_dev_dir and calls == [("owner/flux", "v1")]


def test_hub_libraries_are_imported_only_when_downloading():
    """The hub module imports neither; training imports no modelscope (transformers itself imports
    huggingface_hub for the tokenizers, which is not ours to avoid)."""
    code = (
        "import sys; from flux_lora.weights import hub; hub.resolve_model('.'); "
        "a = sorted(m for m in ('huggingface_hub', 'modelscope') if m in sys.modules); "
        "from flux_lora.training import run; print(a, 'modelscope' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd())
    assert out.stdout.strip() == "[] False"


def test_train_reports_a_missing_model_in_one_line(tmp_path, caplog, monkeypatch):
    for name in FUNCTIONS.values():
        monkeypatch.setattr(hub, name, lambda *a, **k: pytest.fail("downloaded"))
    argv = [
        "--config=configs/tiny.yaml",
        f"--model.source={tmp_path}/models/x",
        "--model.tiny_if_missing=false",
        f"--output_dir={tmp_path / 'run'}",
        f"--data.cache_dir={tmp_path / 'cache'}",
    ]
    assert train.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        f"{tmp_path}/models/x: no such folder or file (a hub repository is owner/name, hf:owner/name or ms:owner/name)"
    ]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """modelscope.cn unreachable, as offline; any connection attempt fails the test, and the cache is empty."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(hub, "_reachable", lambda host: False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))


def test_modelscope_offline_is_one_short_line_without_retries(no_network, caplog):
    import time

    start = time.perf_counter()
    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model("AI-ModelScope/FLUX.1-dev")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    assert "offline and not in the download cache" in msg and "--model.source /path" in msg
    assert not [r for r in caplog.records if "retry" in r.getMessage()]
    assert time.perf_counter() - start < 20


def test_generate_names_its_own_flag_when_the_model_is_offline(no_network, caplog):
    from flux_lora.cli import generate

    assert generate.cli(["--model", "AI-ModelScope/FLUX.1-dev", "--prompt", "x", "--output", "x.png"]) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "--model /path" in line and "--model.source" not in line, line


def test_hugging_face_offline_does_not_quote_the_inner_error():
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub, and we cannot find the appropriate "
            "snapshot folder for the specified revision on ):"
        )

    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model("hf:black-forest-labs/FLUX.1-dev", download=offline)
    msg = str(e.value)
    assert "offline and not in the download cache" in msg and "specified revision" not in msg and len(msg) < 300
