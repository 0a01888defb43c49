"""The web UI in a real browser (Debian's headless Chromium driven by Playwright): load examples/pink, edit a
caption, pick a preset, start a toy run, watch its loss curve and a preview, stop it (checkpoint written, exit
143), resume it to the end, draw a test-bench grid; then the LoRA the UI run wrote equals, tensor for tensor and
bit for bit, the LoRA of ``python train.py --config <the YAML the UI wrote>`` run from the command line. The
screenshots land in the test's tmp folder; ``UI_SCREENSHOTS=docs`` copies the key ones to docs/ui-*.png."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPTS = ["a pink circle in the centre, large, on a white background", "a pink square on the left, small"]

if not Path(CHROMIUM).is_file():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: the README's set-up command installs Debian's chromium")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api") if not os.environ.get("CI") else None
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(data: Path, out: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    args = [sys.executable, "-m", "flux_lora.ui", "--port", str(port), "--data-root", str(data)]
    args += ["--output-root", str(out), "--configs", str(ROOT / "configs")]
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the UI did not answer in 60 s:\n" + log.read_text())


def _field(page: Page, elem_id: str) -> object:
    return page.locator(f"#{elem_id} :is(input, textarea)").first


def _fill(page: Page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} :is(input, textarea)").first
    box.fill(value)
    box.press("Tab")


KEY_SHOTS = ("dataset", "presets", "run-training", "run-finished", "bench")


def _shot(page: Page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"ui-{name}.png"), full_page=True)
    if os.environ.get("UI_SCREENSHOTS") and name in KEY_SHOTS:
        shutil.copy(folder / f"ui-{name}.png", ROOT / os.environ["UI_SCREENSHOTS"] / f"ui-{name}.png")


def _status(page: Page) -> str:
    return page.locator("#run-status").inner_text()


def _wait_status(page: Page, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = _status(page)
        if re.search(pattern, text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"run status never matched {pattern!r}; last: {text!r}")


def test_ui_in_a_browser(tmp_path: Path) -> None:
    data, out, shots = tmp_path / "pink", tmp_path / "outputs", tmp_path / "screenshots"
    shutil.copytree(ROOT / "examples" / "pink", data)
    shots.mkdir()
    started = time.monotonic()
    server = _serve(data, out, _free_port(), tmp_path / "server.log")
    port = int(server.args[4])  # type: ignore[index]
    start_s = time.monotonic() - started
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            maps = Path(f"/proc/{server.pid}/maps")
            assert not maps.is_file() or "libtorch" not in maps.read_text(), "the UI server imported torch"
            _flow(page, data, out, shots)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert start_s < 30, f"the UI took {start_s:.0f} s to answer"

    # the UI's run (stopped, then resumed) and the same YAML run straight from the command line: same LoRA
    run_yaml = out / "ui-run" / "run.yaml"
    cli_out = tmp_path / "cli-run"
    done = subprocess.run(
        [sys.executable, "train.py", "--config", str(run_yaml), "--output_dir", str(cli_out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ui_lora, cli_lora = load_file(out / "ui-run" / "ui-run.safetensors"), load_file(cli_out / "ui-run.safetensors")
    assert ui_lora.keys() == cli_lora.keys() and ui_lora
    for key, value in ui_lora.items():
        other = cli_lora[key]
        assert value.dtype == other.dtype and value.shape == other.shape, key
        assert torch.equal(value.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), key


def _flow(page: Page, data: Path, out: Path, shots: Path) -> None:
    # Dataset: scan, pick an image, edit its caption (written beside the image)
    _fill(page, "data-res", "64, 512")
    page.locator("#data-load").click()
    expect(page.locator("#data-status")).to_contain_text("24 images", timeout=30_000)
    page.locator("#data-gallery img").first.click()
    expect(_field(page, "caption-image")).not_to_have_value("", timeout=10_000)  # type: ignore[arg-type]
    image = _field(page, "caption-image").input_value()  # type: ignore[attr-defined]
    _fill(page, "caption-text", "a pink circle, edited in the browser")
    page.locator("#caption-save").click()
    expect(page.locator("#data-status")).to_contain_text("saved", timeout=15_000)
    assert (data / image).with_suffix(".txt").read_text() == "a pink circle, edited in the browser\n"
    _shot(page, shots, "dataset")

    # Presets: a 24 GB card at 1024 px (fp8, what the page is for: the picture in the README), then the 80 GB card
    # at the toy's 64 px for the run below, each with the memory model's estimate shown
    page.get_by_role("tab", name="Presets").click()
    page.locator("#preset-card label", has_text="24").click()
    _fill(page, "preset-res", "1024")
    expect(page.locator("#preset-view")).to_contain_text("24 GB card, 1024 px", timeout=10_000)
    expect(page.locator("#preset-view")).to_contain_text("float8_e4m3fn")
    expect(page.locator("#preset-card input[value='24']")).to_be_checked()
    page.mouse.move(0, 0)  # no hover highlight in the picture
    _shot(page, shots, "presets")
    page.locator("#preset-card label", has_text="80").click()
    _fill(page, "preset-res", "64")
    expect(page.locator("#preset-view")).to_contain_text("80 GB card, 64 px", timeout=10_000)
    expect(page.locator("#preset-view")).to_contain_text("Estimated peak memory")
    page.locator("#preset-use").click()
    expect(page.locator("#preset-used")).to_contain_text("Using preset", timeout=10_000)

    # Runs: build the YAML from configs/toy.yaml, start, watch, stop, resume
    page.get_by_role("tab", name="Runs").click()
    _fill(page, "run-name", "ui-run")
    template = page.locator("#run-template input")
    template.click()
    page.get_by_role("option", name="toy.yaml", exact=True).click()
    for elem_id, value in (("run-max-steps", "40"), ("run-ckpt", "10"), ("run-sample-every", "20")):
        _fill(page, elem_id, value)
    _fill(page, "run-sample-steps", "4")
    _fill(page, "run-prompts", "\n".join(PROMPTS))
    page.locator("#run-build").click()
    expect(page.locator("#run-yaml")).to_contain_text("name: ui-run", timeout=10_000)
    expect(page.locator("#run-preset")).to_contain_text("80 GB, 64 px")
    text = page.locator("#run-yaml .cm-content").inner_text()
    assert re.search(r"\n  resolution: 64\n", text), text  # the preset's resolution
    # edit the YAML as a person may: the toy's float32, batch, rank and no block swap whatever the 80 GB preset
    # chose for FLUX.1-dev (fp8 is slow on a CPU), and a progress line every 5 steps
    text = re.sub(r"\n\s*quantize: .*", "", text)
    for key, value in (("log_every_n_steps", 5), ("batch_size", 4), ("rank", 16), ("blocks_to_swap", 0)):
        text = re.sub(rf"\b{key}: \S+", f"{key}: {value}", text)
    page.locator("#run-yaml .cm-content").click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)
    expect(page.locator("#run-yaml")).to_contain_text("log_every_n_steps: 5")
    page.locator("#run-start").click()
    expect(page.locator("#run-start-msg")).to_contain_text("started", timeout=15_000)
    text = _wait_status(page, r"step (1\d|[2-9]\d)\b", 240)  # trained past the first checkpoint
    assert "running" in text
    expect(page.locator("#run-previews img").first).to_be_visible(timeout=20_000)
    expect(page.locator("#run-loss :is(canvas, svg)").first).to_be_visible(timeout=20_000)
    _shot(page, shots, "run-training")
    page.locator("#run-stop").click()
    text = _wait_status(page, r"^ui-run: stopped \(checkpoint written\)", 60)  # the process has exited
    checkpoints = sorted((out / "ui-run" / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "no checkpoint after the stop"
    assert not (out / "ui-run" / "ui-run.safetensors").exists(), "the run ended before the stop"
    _shot(page, shots, "run-stopped")
    page.locator("#run-resume").click()
    _wait_status(page, r"^ui-run: finished", 300)
    assert (out / "ui-run" / "ui-run.safetensors").is_file()
    _shot(page, shots, "run-finished")

    # Test bench: the run's LoRA at strengths 0 and 1 on two prompts, one seed
    page.get_by_role("tab", name="Test bench").click()
    page.locator("#bench-refresh").click()
    page.locator("#bench-loras input").click()
    page.get_by_role("option", name="ui-run/ui-run.safetensors", exact=True).click()
    page.keyboard.press("Escape")
    _fill(page, "bench-prompts", "\n".join(PROMPTS))
    _fill(page, "bench-strengths", "0, 1")
    _fill(page, "bench-steps", "4")
    _fill(page, "bench-size", "64")
    expect(_field(page, "bench-model")).to_have_value("models/flux-toy", timeout=10_000)  # type: ignore[arg-type]
    page.locator("#bench-go").click()
    expect(page.locator("#bench-status")).to_contain_text("4 images", timeout=90_000)
    expect(page.locator("#bench-grid img").first).to_be_visible(timeout=10_000)
    _shot(page, shots, "bench")
    cells = sorted((out / "bench").glob("*/p*.png"))
    assert len(cells) == 4
    info = Image.open(cells[0]).text  # type: ignore[attr-defined]
    assert 'Lora hashes: "ui-run: ' in info["parameters"] and "flux_lora" in info
    assert np.asarray(Image.open(cells[0])).std() > 0
