"""The web UI's checks without a browser: paths stay inside their roots (no '..', no absolute path, no symlink
escape), a remote host needs a token and every request without it gets 401, uploads must be images, and the UI's
modules import no torch."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from flux_lora.ui import dataset, events, runs
from flux_lora.ui.auth import host_token, token_middleware
from flux_lora.ui.paths import PathError, Roots, inside

ROOT = Path(__file__).parents[1]


@pytest.fixture
def roots(tmp_path: Path) -> Roots:
    (tmp_path / "data" / "set").mkdir(parents=True)
    Image.new("RGB", (32, 48), "red").save(tmp_path / "data" / "set" / "a.png")
    (tmp_path / "data" / "set" / "a.txt").write_text("a red thing\n")
    (tmp_path / "secret.txt").write_text("outside")
    return Roots.of(tmp_path / "data", tmp_path / "out")


@pytest.mark.parametrize("bad", ["..", "../secret.txt", "set/../../secret.txt", "/etc/passwd", "C:\\x"])
def test_paths_outside_the_root_are_refused(roots: Roots, bad: str) -> None:
    with pytest.raises(PathError):
        roots.data_path(bad)


def test_paths_inside_the_root_resolve(roots: Roots) -> None:
    assert roots.data_path("") == roots.data
    assert roots.data_path("set/a.png") == roots.data / "set" / "a.png"


def test_a_symlink_out_of_the_root_is_refused(roots: Roots) -> None:
    (roots.data / "link").symlink_to(roots.data.parent)
    (roots.data / "set" / "b.txt").symlink_to(roots.data.parent / "secret.txt")
    with pytest.raises(PathError, match="outside"):
        inside(roots.data, "link/secret.txt")
    with pytest.raises(PathError, match="outside"):
        dataset.save_caption(roots, "link/set/a.png", "x")  # the image exists, but through the link
    with pytest.raises(PathError):
        roots.data_path("set/b.txt")
    assert (roots.data.parent / "secret.txt").read_text() == "outside"


def test_a_caption_is_written_beside_its_image(roots: Roots) -> None:
    dataset.save_caption(roots, "set/a.png", "  a new caption ")
    assert (roots.data / "set" / "a.txt").read_text() == "a new caption\n"
    with pytest.raises(PathError):
        dataset.save_caption(roots, "set/a.txt", "not an image")


def test_an_upload_that_is_not_an_image_is_refused(roots: Roots) -> None:
    with pytest.raises(ValueError, match="not a readable image"):
        dataset.save_upload(roots, "set", "evil.png", b"#!/bin/sh\nrm -rf /\n")
    with pytest.raises(ValueError, match="not an image file name"):
        dataset.save_upload(roots, "set", "x.sh", b"echo")
    png = io.BytesIO()
    Image.new("RGB", (16, 16), "blue").save(png, format="PNG")
    with pytest.raises(ValueError, match="over the upload limit"):
        dataset.save_upload(roots, "set", "big.png", png.getvalue(), max_bytes=10)
    with pytest.raises(PathError):
        dataset.save_upload(roots, "..", "b.png", png.getvalue())
    saved = dataset.save_upload(roots, "set", "../../b.png", png.getvalue())  # the name's folders are dropped
    assert saved == roots.data / "set" / "b.png" and Image.open(saved).size == (16, 16)
    with pytest.raises(ValueError, match="exists"):
        dataset.save_upload(roots, "set", "b.png", png.getvalue())
    assert not list((roots.data / "set").glob("evil*")) and not (roots.data.parent / "b.png").exists()


def test_the_scan_view_shows_buckets_repeats_and_warnings(roots: Roots) -> None:
    kohya = roots.data / "set" / "3_sks toy"
    kohya.mkdir()
    Image.new("RGB", (64, 64), "green").save(kohya / "k.png")
    (roots.data / "set" / "broken.png").write_bytes(b"not a png")
    view = dataset.scan_folder(roots, "set", [32, 64], trigger_word="sks")
    rows = {r.file: r for r in view.rows}
    assert rows["set/a.png"].caption == "sks, a red thing"
    assert rows["set/3_sks toy/k.png"].repeats == 3 and rows["set/3_sks toy/k.png"].caption == "sks toy"
    assert rows["set/a.png"].buckets.startswith("32: 32x32")
    assert any("broken.png" in w for w in view.warnings)


def test_a_remote_host_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLUX_LORA_UI_TOKEN", raising=False)
    assert host_token("127.0.0.1", None) == (None, None)
    token, refusal = host_token("0.0.0.0", None)
    assert token is None and refusal and "--token" in refusal
    assert host_token("0.0.0.0", "s3cret") == ("s3cret", None)
    monkeypatch.setenv("FLUX_LORA_UI_TOKEN", "env")
    assert host_token("0.0.0.0", None) == ("env", None)


def test_the_program_refuses_a_remote_host_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLUX_LORA_UI_TOKEN"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "flux_lora.ui", "--host", "0.0.0.0", "--output-root", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--token" in done.stderr


def test_requests_without_the_token_get_401() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.middleware("http")(token_middleware("s3cret"))
    app.get("/")(lambda: {"ok": True})
    client = TestClient(app)
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/?token=s3cret").status_code == 200
    assert client.get("/").status_code == 200  # the cookie the query set


def test_a_run_config_stays_in_the_roots(roots: Roots) -> None:
    text = runs.build_config({"data": {"source": "x"}}, roots, "r1", ["set"], {"train.max_steps": 5})
    assert runs.check_config(text, roots) == ("r1", roots.output / "r1")
    with pytest.raises(PathError):
        runs.build_config({}, roots, "../r1", [], {})
    with pytest.raises(PathError):
        runs.build_config({}, roots, "r1", ["../.."], {})
    with pytest.raises(PathError):
        runs.check_config(text.replace(str(roots.output / "r1"), "/tmp/elsewhere"), roots)
    with pytest.raises(PathError):
        runs.check_config(text.replace(str(roots.data / "set"), str(roots.data.parent)), roots)


def test_events_are_read_and_requests_left(tmp_path: Path) -> None:
    lines = [
        '{"t": 1.0, "event": "start", "step": 0, "max_steps": 10, "name": "r", "resumed_from": null, "pid": 1}',
        '{"t": 2.0, "event": "step", "step": 5, "loss": 0.5, "lr": 0.001, "steps_per_s": 2.0, "eta_s": 2.5}',
        '{"t": 3.0, "event": "sample", "step": 5, "path": "/x.png", "prompt": "a cat", "seed": 0}',
        '{"t": 4.0, "event": "end", "step": 5, "status": "stopped", "message": "stopped at step 5"}',
        '{"t": 5.0, "event": "st',  # a partial last line
    ]
    (tmp_path / "events.jsonl").write_text("\n".join(lines))
    v = events.view(tmp_path)
    assert (v.step, v.max_steps, v.steps_per_s, v.status) == (5, 10, 2.0, "stopped")
    assert v.curve == [(5, "loss", 0.5), (5, "lr", 0.001)] and v.previews == [("/x.png", "step 5: a cat")]
    assert events.request(tmp_path, "save-now") == tmp_path / "control" / "save-now"
    assert (tmp_path / "control" / "save-now").is_file()


def test_the_ui_imports_no_torch_and_refuses_before_gradio() -> None:
    """The server's arguments and the pages' logic need neither torch nor Gradio (the browser test checks the
    running server for torch); the Gradio page itself is imported only after the checks."""
    modules = "flux_lora.ui.server, flux_lora.ui.dataset, flux_lora.ui.runs, flux_lora.ui.bench, flux_lora.ui.presets"
    code = f"import sys, {modules}; print('torch' in sys.modules, 'gradio' in sys.modules)"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "False False", done.stderr


FAKE_TRAINER = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as train.py: checkpoint, exit 143
config = Path(sys.argv[2])
(config.parent / "started").write_text(str(time.time()))
time.sleep(float(config.read_text().split("# sleep ")[1]))
"""


def test_the_queue_runs_one_job_after_another_and_stop_is_sigterm(roots: Roots, tmp_path: Path) -> None:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)
    manager = runs.RunManager(roots, train_script=str(script))
    jobs = []
    for name, sleep in (("first", 0.2), ("second", 30.0)):
        text = runs.build_config({}, roots, name, ["set"], {}) + f"# sleep {sleep}\n"
        jobs.append(manager.save(text))
    assert (roots.output / "first" / "run.yaml").is_file()
    assert manager.enqueue(jobs[0]) == "first: started"
    assert manager.enqueue(jobs[1]) == "second: queued (1)"
    assert manager.status("second") == "queued" and not (roots.output / "second" / "started").exists()
    deadline = time.monotonic() + 30
    while manager.running_name() != "second" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert manager.status("first") == "finished" and manager.running_name() == "second"
    while not (roots.output / "second" / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert manager.stop("second").startswith("second: stop requested")
    while manager.running_name() and time.monotonic() < deadline:
        time.sleep(0.1)
    manager.poll()
    assert manager.status("second") == "stopped (checkpoint written)"
    assert set(manager.names()) == {"first", "second"}


SLOW_STOP_TRAINER = """
import signal, sys, time
from pathlib import Path
config = Path(sys.argv[2])
runs = config.parent / "runs"
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
def stop(*_):
    time.sleep(1.5)  # writing its checkpoint
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
time.sleep(30 if len(runs.read_text()) == 1 else 0.1)
"""


def test_resume_pressed_while_the_run_still_writes_its_checkpoint_starts_it_after(roots: Roots, tmp_path: Path) -> None:
    """Between SIGTERM and the trainer's exit the run is "stopping"; Resume then queues it rather than saying it is
    already running, and it starts once the stopped process has exited."""
    script = tmp_path / "slow_stop.py"
    script.write_text(SLOW_STOP_TRAINER)
    manager = runs.RunManager(roots, train_script=str(script))
    job = manager.save(runs.build_config({}, roots, "run", ["set"], {}))
    assert manager.enqueue(job) == "run: started"
    deadline = time.monotonic() + 30
    while not (job.folder / "runs").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.resume("run") == "run is already running or queued"
    manager.stop("run")
    assert manager.status("run") == "stopping (writing its checkpoint)"
    assert manager.resume("run") == "run: queued (1)"
    while (job.folder / "runs").read_text() != "xx" and time.monotonic() < deadline:
        time.sleep(0.05)
    while manager.running_name() and time.monotonic() < deadline:
        time.sleep(0.05)
    manager.poll()
    assert (job.folder / "runs").read_text() == "xx" and manager.status("run") == "finished"


LOCKED_TRAINER = """
import sys
print("2026-12-07 05:00:00,000 INFO flux_lora.data.scan: scanned x: 1 images")
print("2026-12-07 05:00:01,000 ERROR flux_lora.train: output_dir /o/r is in use by process 7 on h: wait for it")
sys.exit(2)
"""


def test_a_refused_run_shows_the_trainers_message(roots: Roots, tmp_path: Path) -> None:
    """The output lock's refusal (train.py logs it as an ERROR line and exits 2) is what the run's status shows."""
    script = tmp_path / "locked_train.py"
    script.write_text(LOCKED_TRAINER)
    manager = runs.RunManager(roots, train_script=str(script))
    manager.enqueue(manager.save(runs.build_config({}, roots, "busy", ["set"], {})))
    deadline = time.monotonic() + 30
    while manager.running_name() and time.monotonic() < deadline:
        time.sleep(0.05)
    manager.poll()
    assert manager.status("busy") == "failed (exit 2): output_dir /o/r is in use by process 7 on h: wait for it"
