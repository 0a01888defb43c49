"""The Gradio page: tabs Dataset, Presets, Runs and Test bench over :mod:`flux_lora.ui`'s functions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import yaml

from flux_lora.ui import bench, dataset, events, presets
from flux_lora.ui.paths import Roots, run_name
from flux_lora.ui.runs import RUN_CONFIG, RunManager, build_config, last_error

THEME = gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = "#run-status, #bench-status, #data-status {min-height: 2em}"


def _error(e: Exception) -> str:
    return f"**Error:** {' '.join(str(e).split())}"


def build(roots: Roots, manager: RunManager, templates: dict[str, Path]) -> gr.Blocks:
    with gr.Blocks(title="flux-lora", analytics_enabled=False) as page:
        gr.Markdown(
            f"**flux-lora** · data root `{roots.data}` · output root `{roots.output}` · every run here is "
            "`python train.py --config <output root>/<name>/run.yaml`"
        )
        preset_state = gr.State({})
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset"):
                _dataset_tab(roots)
            with gr.Tab("Presets", id="presets"):
                preset_label = _presets_tab(preset_state)
            with gr.Tab("Runs", id="runs"):
                _runs_tab(roots, manager, templates, preset_state, preset_label)
            with gr.Tab("Test bench", id="bench"):
                _bench_tab(roots)
    return page


# ------------------------------------------------------------------------------------------ Dataset


def _dataset_tab(roots: Roots) -> None:
    with gr.Row():
        folder = gr.Textbox(".", label=f"Folder (relative to {roots.data})", elem_id="data-folder", scale=3)
        res = gr.Textbox("512, 1024", label="Resolutions (px)", elem_id="data-res", scale=1)
        trigger = gr.Textbox("", label="Trigger word (optional)", elem_id="data-trigger", scale=1)
        load = gr.Button("Load dataset", variant="primary", elem_id="data-load", scale=1)
    status = gr.Markdown(elem_id="data-status")
    warnings = gr.Textbox(label="Scanner warnings", lines=2, interactive=False, elem_id="data-warnings")
    gallery = gr.Gallery(
        label="Images (click one to edit its caption)",
        columns=12,
        height=220,
        allow_preview=False,
        elem_id="data-gallery",
    )
    table = gr.Dataframe(
        headers=["file", "caption (as trained)", "repeats", "size", "bucket and crop per resolution", "warning"],
        label="What the trainer will use",
        interactive=False,
        wrap=True,
        column_widths=["13%", "33%", "7%", "7%", "32%", "8%"],
        elem_id="data-table",
    )
    with gr.Row():
        image = gr.Textbox(label="Image", interactive=False, elem_id="caption-image", scale=1)
        caption = gr.Textbox(label="Caption (the .txt beside the image)", lines=2, elem_id="caption-text", scale=3)
        save = gr.Button("Save caption", elem_id="caption-save", scale=1)
    with gr.Row():
        upload = gr.File(label="Upload images into the folder", file_count="multiple", elem_id="data-upload")
        upload_status = gr.Markdown(elem_id="upload-status")
    rows_state = gr.State([])

    def do_load(folder_text: str, res_text: str, trigger_word: str) -> tuple[Any, ...]:
        try:
            view = dataset.scan_folder(roots, folder_text, dataset.resolutions_of(res_text), trigger_word or None)
        except (ValueError, OSError) as e:
            return _error(e), "", [], None, []
        rows = [[r.file, r.caption, r.repeats, r.size, r.buckets, r.warning] for r in view.rows]
        shots = [(str(roots.data / r.file), f"{Path(r.file).name}: {r.caption}") for r in view.rows]
        total = sum(r.repeats for r in view.rows)
        note = f"{len(rows)} images, {total} samples per epoch (with repeats)"
        return note, "\n".join(view.warnings) or "none", shots, pd.DataFrame(rows, columns=_COLUMNS), rows

    load.click(do_load, [folder, res, trigger], [status, warnings, gallery, table, rows_state])

    def pick(rows: list[list[Any]], evt: gr.SelectData) -> tuple[str, str]:
        file = rows[evt.index][0]
        return file, dataset.read_caption(roots, file)

    gallery.select(pick, [rows_state], [image, caption])

    def do_save(file: str, text: str, folder_text: str, res_text: str, trigger_word: str) -> tuple[Any, ...]:
        try:
            path = dataset.save_caption(roots, file, text)
        except (ValueError, OSError) as e:
            return (_error(e), *([gr.update()] * 4))
        note, warn, shots, frame, rows = do_load(folder_text, res_text, trigger_word)
        return f"saved {path.relative_to(roots.data)}; {note}", warn, shots, frame, rows

    save.click(do_save, [image, caption, folder, res, trigger], [status, warnings, gallery, table, rows_state])

    def do_upload(files: list[str] | None, folder_text: str) -> str:
        lines = []
        for f in files or []:
            try:
                data = Path(f).read_bytes()
                lines.append(f"added {dataset.save_upload(roots, folder_text, Path(f).name, data).name}")
            except (ValueError, OSError) as e:
                lines.append(_error(e))
        return "  \n".join(lines)

    upload.upload(do_upload, [upload, folder], [upload_status])


_COLUMNS = ["file", "caption (as trained)", "repeats", "size", "bucket and crop per resolution", "warning"]


# ------------------------------------------------------------------------------------------ Presets


def _presets_tab(state: gr.State) -> gr.Markdown:
    gr.Markdown(
        "Pick a model, a card and a resolution: the settings come from the project's memory model, and its "
        "**estimate** of the peak memory is shown before anything starts."
    )
    with gr.Row():
        variant = gr.Dropdown(list(presets.VARIANTS), value="flux-dev", label="Model", elem_id="preset-variant")
        card = gr.Radio([str(c) for c in presets.CARD_SIZES_GB], value="24", label="Card (GB)", elem_id="preset-card")
        res = gr.Number(1024, label="Resolution (px)", precision=0, elem_id="preset-res")

    def view(v: str, c: str, r: float) -> str:
        try:
            return presets.preset(int(c), int(r), v)[1]
        except (ValueError, TypeError) as e:
            return _error(e)

    show = gr.Markdown(view("flux-dev", "24", 1024), elem_id="preset-view")
    use = gr.Button("Use this preset for the next run", variant="primary", elem_id="preset-use")
    used = gr.Markdown(elem_id="preset-used")

    def choose(v: str, c: str, r: float) -> tuple[dict[str, Any], str, str]:
        try:
            overrides, _ = presets.preset(int(c), int(r), v)
        except (ValueError, TypeError) as e:
            return {}, _error(e), ""
        label = f"preset: {v}, {c} GB, {int(r)} px"
        return overrides, f"Using {label} (Runs tab: **Build YAML**)", label

    label = gr.Markdown(visible=False)
    for control in (variant, card, res):
        control.change(view, [variant, card, res], [show])
    use.click(choose, [variant, card, res], [state, used, label])
    return label


# ------------------------------------------------------------------------------------------ Runs


def _runs_tab(
    roots: Roots, manager: RunManager, templates: dict[str, Path], preset_state: gr.State, preset_label: gr.Markdown
) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("### New run")
            with gr.Row():
                name = gr.Textbox("my-lora", label="Name (its folder in the output root)", elem_id="run-name")
                template = gr.Dropdown(
                    list(templates), value=next(iter(templates), None), label="Start from", elem_id="run-template"
                )
            datasets = gr.Textbox(
                ".", label=f"Dataset folders, one a line (relative to {roots.data})", lines=1, elem_id="run-datasets"
            )
            with gr.Row():
                max_steps = gr.Number(None, label="Max steps", precision=0, elem_id="run-max-steps")
                ckpt = gr.Number(None, label="Checkpoint every", precision=0, elem_id="run-ckpt")
                sample_every = gr.Number(None, label="Preview every", precision=0, elem_id="run-sample-every")
                sample_steps = gr.Number(None, label="Preview steps", precision=0, elem_id="run-sample-steps")
            prompts = gr.Textbox(
                "",
                label="Preview prompts, one a line (replace the template's prompts and keep prompts)",
                lines=2,
                elem_id="run-prompts",
            )
            preset_used = gr.Markdown("no preset (the template's settings)", elem_id="run-preset")
            build_btn = gr.Button("Build YAML", elem_id="run-build")
            config = gr.Code(
                "",
                language="yaml",
                label="run.yaml (edit freely)",
                interactive=True,
                wrap_lines=True,
                elem_id="run-yaml",
            )
            start = gr.Button("Start (queued when a run is going)", variant="primary", elem_id="run-start")
            start_msg = gr.Markdown(elem_id="run-start-msg")
        with gr.Column(scale=3):
            gr.Markdown("### Runs in the output root")
            with gr.Row():
                runs = gr.Dropdown(manager.names(), label="Run", elem_id="run-select", allow_custom_value=True)
                stop = gr.Button("Stop", elem_id="run-stop", variant="stop")
                resume = gr.Button("Resume", elem_id="run-resume")
                save_now = gr.Button("Save now", elem_id="run-save-now")
                sample_now = gr.Button("Sample now", elem_id="run-sample-now")
            status = gr.Markdown(elem_id="run-status")
            with gr.Row():
                loss = gr.LinePlot(x="step", y="value", title="loss", height=220, elem_id="run-loss")
                lr = gr.LinePlot(x="step", y="value", title="learning rate", height=220, elem_id="run-lr")
            previews = gr.Gallery(
                label="Previews (step: prompt)",
                columns=6,
                height=240,
                object_fit="contain",
                fit_columns=False,
                elem_id="run-previews",
            )
            settings = gr.Code(
                "", language="yaml", label="The YAML that reproduces it", interactive=False, wrap_lines=True
            )
    timer = gr.Timer(1.0)

    preset_label.change(lambda s: s or "no preset", [preset_label], [preset_used])

    def do_build(
        n: str, t: str, d: str, ms: float | None, ck: float | None, se: float | None, ss: float | None, p: str,
        preset: dict[str, Any],
    ) -> tuple[str, str]:  # fmt: skip
        try:
            base = yaml.safe_load(templates[t].read_text()) if t in templates else {}
            overrides: dict[str, Any] = dict(preset or {})
            for key, value in (
                ("train.max_steps", ms),
                ("train.checkpoint_every_n_steps", ck),
                ("sample.every_n_steps", se),
                ("sample.steps", ss),
            ):
                if value is not None:
                    overrides[key] = int(value)
            lines = [line.strip() for line in p.splitlines() if line.strip()]
            if lines:
                overrides["sample.prompts"], overrides["sample.keep_prompts"] = lines, []
            folders = [line.strip() for line in d.splitlines() if line.strip()]
            return build_config(base, roots, n, folders, overrides), ""
        except (ValueError, OSError, KeyError) as e:
            return gr.update(), _error(e)  # type: ignore[return-value]

    build_btn.click(
        do_build,
        [name, template, datasets, max_steps, ckpt, sample_every, sample_steps, prompts, preset_state],
        [config, start_msg],
    )

    def do_start(text: str) -> tuple[str, Any]:
        try:
            job = manager.save(text)
            message = manager.enqueue(job)
        except (ValueError, OSError) as e:
            return _error(e), gr.update()
        return message, gr.update(choices=manager.names(), value=job.name)

    start.click(do_start, [config], [start_msg, runs])

    def act(what: str, selected: str | None) -> str:
        if not selected:
            return "choose a run first"
        try:
            if what == "stop":
                return manager.stop(selected)
            if what == "resume":
                return manager.resume(selected)
            path = events.request(roots.output_path(run_name(selected)), what)  # type: ignore[arg-type]
            return f"{what} requested ({path.name} left for the trainer)"
        except (ValueError, OSError) as e:
            return _error(e)

    stop.click(lambda s: act("stop", s), [runs], [start_msg])
    resume.click(lambda s: act("resume", s), [runs], [start_msg])
    save_now.click(lambda s: act("save-now", s), [runs], [start_msg])
    sample_now.click(lambda s: act("sample-now", s), [runs], [start_msg])

    seen = gr.State("")

    def refresh(selected: str | None, last: str) -> tuple[Any, ...]:
        """The selected run's view; components are sent again only when something changed."""
        names = manager.names()
        if not selected or selected not in names:
            return gr.update(choices=names), "no run selected", None, None, [], "", ""
        folder = roots.output_path(selected)
        v = events.view(folder, folder / "console.log")
        text = _status_text(selected, manager.status(selected), v, folder)
        previews = [(p, c) for p, c in v.previews[-12:] if Path(p).is_file()]
        config_file = folder / RUN_CONFIG if (folder / RUN_CONFIG).is_file() else folder / "config.yaml"
        shown = config_file.read_text() if config_file.is_file() else ""
        signature = repr((names, text, len(v.curve), previews, shown))
        if signature == last:
            return (*([gr.update()] * 6), last)
        curve = pd.DataFrame(v.curve, columns=["step", "series", "value"]).astype({"step": int, "value": float})
        loss_frame = curve[curve.series == "loss"][["step", "value"]]
        lr_frame = curve[curve.series == "lr"][["step", "value"]]
        return gr.update(choices=names), text, loss_frame, lr_frame, previews, shown, signature

    outputs = [runs, status, loss, lr, previews, settings, seen]
    timer.tick(refresh, [runs, seen], outputs, show_progress="hidden")
    runs.change(refresh, [runs, gr.State("")], outputs)


def _status_text(name: str, state: str, v: events.RunView, folder: Path) -> str:
    """One line of progress, the start/end summaries, and the last error when there is one."""
    if state == "not running from this UI":
        state = _outside_state(v)
    parts = [f"**{name}**: {state}", f"step **{v.step}**" + (f" of {v.max_steps}" if v.max_steps else "")]
    if v.steps_per_s:
        parts.append(f"{v.steps_per_s:.2f} steps/s")
    if v.eta and state == "running":
        parts.append(f"ETA {v.eta}")
    parts.append(f"{len(v.checkpoints)} checkpoints, {len(v.loras)} LoRA files")
    text = " · ".join(parts)
    if v.summaries:
        text += "\n\n" + "  \n".join(v.summaries[-4:])
    error = last_error(folder / "console.log")
    if error and "failed" not in state and ("error" in error.lower() or "in use" in error):
        text += f"\n\nlast message: `{error}`"
    return text


def _outside_state(v: events.RunView) -> str:
    if v.status:
        return v.status
    if v.pid and _alive(v.pid):
        return f"running (process {v.pid}, started outside this UI)"
    return "idle" if v.step == 0 else f"stopped at step {v.step}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------ Test bench


def _bench_tab(roots: Roots) -> None:
    gr.Markdown(
        "A grid of prompts x strengths x LoRA files with one fixed seed, drawn by `generate.py` (the PNGs carry "
        f"the same metadata as the command line's) into `{roots.output / bench.BENCH_DIR}`."
    )
    with gr.Row():
        loras = gr.Dropdown(bench.lora_files(roots), multiselect=True, label="LoRA files", elem_id="bench-loras")
        refresh = gr.Button("Refresh list", elem_id="bench-refresh", scale=0)
    prompts = gr.Textbox("", label="Prompts, one a line", lines=3, elem_id="bench-prompts")
    with gr.Row():
        strengths = gr.Textbox("0, 0.5, 1", label="Strengths", elem_id="bench-strengths")
        seed = gr.Number(42, label="Seed (fixed)", precision=0, elem_id="bench-seed")
        steps = gr.Number(20, label="Steps", precision=0, elem_id="bench-steps")
        size = gr.Number(1024, label="Size (px)", precision=0, elem_id="bench-size")
    with gr.Row():
        model = gr.Textbox("", label="Model (the LoRA's run's model.source by default)", elem_id="bench-model")
        quantize = gr.Dropdown(["none", "float8_e4m3fn", "float8_e5m2"], value="none", label="--quantize")
        offload = gr.Dropdown(["none", "model", "block"], value="none", label="--offload")
    go = gr.Button("Generate grid", variant="primary", elem_id="bench-go")
    status = gr.Markdown(elem_id="bench-status")
    grid = gr.Image(label="Grid", type="filepath", elem_id="bench-grid", interactive=False)

    refresh.click(lambda: gr.update(choices=bench.lora_files(roots)), [], [loras])

    def model_of(selected: list[str] | None, current: str) -> str:
        for rel in selected or []:
            run = roots.output_path(rel).parent
            for name in (RUN_CONFIG, "config.yaml"):
                if (run / name).is_file():
                    source = (yaml.safe_load((run / name).read_text()) or {}).get("model", {}).get("source")
                    if source:
                        return str(source)
        return current

    loras.change(model_of, [loras, model], [model])

    def do_grid(
        sel: list[str] | None, p: str, st: str, sd: float, n: float, sz: float, m: str, q: str, o: str
    ) -> tuple[str, str | None]:
        try:
            lines = [line.strip() for line in p.splitlines() if line.strip()]
            if not m.strip():
                raise ValueError("give the model (a folder or hub id)")
            path, cells = bench.run_grid(
                roots,
                sel or [],
                lines,
                bench.parse_strengths(st),
                model=m.strip(),
                seed=int(sd),
                steps=int(n),
                size=int(sz),
                quantize=q,
                offload=o,
            )
        except (ValueError, OSError, RuntimeError) as e:
            return _error(e), None
        return f"{len(cells)} images in `{path.parent}`", str(path)

    go.click(do_grid, [loras, prompts, strengths, seed, steps, size, model, quantize, offload], [status, grid])
