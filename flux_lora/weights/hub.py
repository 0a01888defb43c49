"""Where model files come from: a local folder, or a ModelScope model id downloaded on demand.

This is the only module that touches the network; ``modelscope`` is imported only when a download is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# Files of the official FLUX.1 repositories each component needs (the diffusers transformer/ and vae/ copies of
# the same weights are not fetched).
COMPONENT_PATTERNS: dict[str, tuple[str, ...]] = {
    "dit": ("flux1-*.safetensors",),
    "ae": ("ae.safetensors",),
    "text_encoders": ("text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"),
    # a ControlNet repository in the diffusers layout: config.json (+ a shard index) and its weights
    "controlnet": ("*.json", "diffusion_pytorch_model*.safetensors"),
}
ALL_COMPONENTS = ("dit", "ae", "text_encoders")  # a FLUX.1 model folder

Downloader = Callable[..., str]


class ModelNotFoundError(FileNotFoundError):
    """The model could be neither found locally nor downloaded; the message says what to do instead."""


def _modelscope_download(model_id: str, **kwargs) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as e:  # pragma: no cover - modelscope is a dependency
        raise ModelNotFoundError(f"downloading {model_id!r} needs the modelscope package ({e})") from e
    return snapshot_download(model_id, **kwargs)


def _looks_like_model_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def missing_files(folder: Path, components: Iterable[str]) -> list[str]:
    """Patterns of ``components`` that match nothing in ``folder``."""
    return [pat for c in components for pat in COMPONENT_PATTERNS[c] if not any(folder.glob(pat))]


def resolve_model(
    source: str | Path,
    components: Iterable[str] = ALL_COMPONENTS,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    download: Downloader | None = None,
    local_files_only: bool = False,
) -> Path:
    """Return a local folder holding ``components`` of the model named by ``source``.

    Args:
        source: a local folder (or file, returned as is) or a ModelScope id such as ``AI-ModelScope/FLUX.1-dev``.
        components: any of ``dit``, ``ae``, ``text_encoders``; only their files are downloaded.
        download: the download function (tests substitute it); defaults to modelscope's ``snapshot_download``.
        local_files_only: only look in the download cache (e.g. in DDP processes after the first fetched it).
    """
    components = tuple(components)
    unknown = set(components) - set(COMPONENT_PATTERNS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {list(COMPONENT_PATTERNS)}")
    path = Path(source).expanduser()
    if path.exists():
        return path
    source = str(source)
    if not _looks_like_model_id(source):
        raise ModelNotFoundError(f"{source}: no such folder or file, and not a ModelScope model id (owner/name)")
    patterns = [p for c in components for p in COMPONENT_PATTERNS[c]]
    log.info("fetching %s from ModelScope: %s", source, ", ".join(patterns))
    try:
        folder = Path(
            (download or _modelscope_download)(
                source,
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir else None,
                allow_patterns=patterns,
                **({"local_files_only": True} if local_files_only else {}),
            )
        )
    except Exception as e:
        raise ModelNotFoundError(
            f"could not download {patterns} of {source!r} from ModelScope ({type(e).__name__}: {e}). If you are "
            "offline or the model is gated, download it once where you can (FLUX.1-dev needs its licence accepted "
            "on modelscope.cn and `modelscope login`), then pass the local folder instead of the id, e.g. "
            "--model /path/to/FLUX.1-dev, holding flux1-dev.safetensors, ae.safetensors, text_encoder/, "
            "text_encoder_2/, tokenizer/ and tokenizer_2/"
        ) from e
    missing = missing_files(folder, components)
    if missing:
        raise ModelNotFoundError(
            f"the download of {source!r} to {folder} lacks {missing}; pass a local folder in the official FLUX.1 "
            "layout instead"
        )
    return folder
