"""``flux-lora-ui [--host H] [--port P] [--data-root D] [--output-root O] [--token T]``: serve the UI.

Safe by default: it listens on 127.0.0.1; another host is refused unless a token is given (``--token`` or
``FLUX_LORA_UI_TOKEN``), and then every request without the token gets 401. Every path it reads or writes stays
inside the data root and the output root. Arguments are checked before Gradio (seconds to import) loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flux_lora.ui.auth import TOKEN_ENV, host_token, token_middleware
from flux_lora.ui.paths import PathError, Roots
from flux_lora.ui.runs import RunManager


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flux-lora-ui", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (another than loopback needs --token)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--data-root", default=".", help="datasets are read, captions and uploads written, only here")
    p.add_argument("--output-root", default="outputs", help="runs, configs and test-bench images go only here")
    p.add_argument("--configs", default="configs", help="folder of the YAML templates a new run starts from")
    p.add_argument("--token", default=None, help=f"required for every request (default: ${TOKEN_ENV})")
    return p


def templates(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    token, refusal = host_token(args.host, args.token)
    if refusal:
        print(f"flux-lora-ui: {refusal}", file=sys.stderr)
        return 2
    try:
        roots = Roots.of(args.data_root, args.output_root)
    except PathError as e:
        print(f"flux-lora-ui: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here, not at the top: Gradio takes seconds to import, which a refusal does not need.
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from flux_lora.ui.app import CSS, THEME, build

    manager = RunManager(roots)
    page = build(roots, manager, templates(Path(args.configs)))
    app = FastAPI()
    if token:
        app.middleware("http")(token_middleware(token))
    app = gr.mount_gradio_app(
        app,
        page,
        path="/",
        allowed_paths=[str(roots.data), str(roots.output)],
        theme=THEME,
        css=CSS,
        ssr_mode=False,
        footer_links=[],
        mcp_server=False,
    )
    print(f"flux-lora-ui: http://{args.host}:{args.port}/ (data {roots.data}, outputs {roots.output})", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        manager.shutdown()
    return 0
