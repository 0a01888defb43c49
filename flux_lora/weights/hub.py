"""Where model files come from: a local folder, or a Hugging Face / ModelScope repository downloaded on demand.

How a source string is read (:func:`parse_source`), in this order:

1. ``hf:owner/name`` or ``ms:owner/name``: that repository on Hugging Face or ModelScope;
2. an existing file or folder: used as is;
3. something that looks like a path (starts with ``.``, ``~`` or ``/``, holds ``\\`` or more than one ``/``, ends
   in ``.safetensors``, or its first part is an existing local folder, as ``models/x`` when ``models/`` exists):
   an error naming the path; no hub is asked;
4. a bare ``owner/name``: a repository on the hub named by ``hub`` (``model.hub``; default ``modelscope``, so
   the ids this project has always shipped, ``AI-ModelScope/FLUX.1-dev``, keep their meaning).

This is the only module that touches the network. ``huggingface_hub`` and ``modelscope`` are imported only
when a download is needed; both read their own cache folder (``HF_HOME``, ``MODELSCOPE_CACHE``), token
(``HF_TOKEN`` or ``huggingface-cli login``) and offline switch (``HF_HUB_OFFLINE``) as they always do.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

HubName = Literal["huggingface", "modelscope"]
DEFAULT_HUB: HubName = "modelscope"
PREFIXES: dict[str, HubName] = {"hf:": "huggingface", "ms:": "modelscope"}

# Files of a FLUX.1 repository each component needs, as alternatives tried in order: the BFL single files first;
# the diffusers copies (transformer/, vae/) are fetched only when a repository lacks them.
COMPONENT_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "dit": (("flux1-*.safetensors",), ("transformer/*",)),
    "ae": (("ae.safetensors",), ("vae/*",)),
    "text_encoders": (("text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"),),
    # a ControlNet repository in the diffusers layout: config.json (+ a shard index) and its weights
    "controlnet": (("*.json", "diffusion_pytorch_model*.safetensors"),),
}
COMPONENT_PATTERNS: dict[str, tuple[str, ...]] = {c: alts[0] for c, alts in COMPONENT_FILES.items()}
ALL_COMPONENTS = ("dit", "ae", "text_encoders")  # a FLUX.1 model folder

Downloader = Callable[..., str]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class ModelNotFoundError(FileNotFoundError):
    """The model could be neither found locally nor downloaded; the one-line message says what to do instead."""


@dataclass(frozen=True)
class Source:
    """A parsed model source: ``hub`` is ``local`` for a path, else the hub holding repository ``name``."""

    hub: Literal["local", "huggingface", "modelscope"]
    name: str


def looks_like_path(source: str) -> bool:
    """True for strings that can only mean a local path (rule 3 of the module docstring)."""
    if source.startswith((".", "~", "/")) or "\\" in source or source.count("/") != 1:
        return True
    return source.endswith(".safetensors") or Path(source.split("/")[0]).is_dir()


def parse_source(source: str | Path, hub: HubName = DEFAULT_HUB) -> Source:
    """Read ``source`` by the module's rule; raises :class:`ModelNotFoundError` naming a missing path."""
    text = str(source)
    for prefix, name in PREFIXES.items():
        if text.startswith(prefix):
            repo = text[len(prefix) :]
            if not _REPO_ID.fullmatch(repo):
                raise ModelNotFoundError(f"{text}: a {name} repository id is owner/name")
            return Source(name, repo)
    path = Path(text).expanduser()
    if path.exists():
        return Source("local", str(path))
    if isinstance(source, Path) or looks_like_path(text) or not _REPO_ID.fullmatch(text):
        raise ModelNotFoundError(
            f"{text}: no such folder or file (a hub repository is owner/name, hf:owner/name or ms:owner/name)"
        )
    return Source(hub, text)


def _huggingface_download(repo_id: str, **kwargs: Any) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


MODELSCOPE_HOST = "modelscope.cn"


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens (one DNS lookup and connect, a few seconds at most)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _modelscope_download(model_id: str, **kwargs: Any) -> str:
    """ModelScope's ``snapshot_download``; offline, only its download cache is read. (Asked over the network it
    retries for many seconds and logs each retry in its own format before failing.)"""
    if not kwargs.get("local_files_only") and not _reachable(MODELSCOPE_HOST):
        kwargs["local_files_only"] = True
    try:
        from modelscope import snapshot_download
    except ImportError as e:  # pragma: no cover - modelscope is a dependency
        raise ModelNotFoundError(f"downloading {model_id!r} needs the modelscope package ({e})") from e
    return snapshot_download(model_id, **kwargs)


def default_download(hub: HubName) -> Downloader:
    """The hub library's ``snapshot_download`` (looked up at call time, so tests can substitute it)."""
    return _huggingface_download if hub == "huggingface" else _modelscope_download


def missing_files(folder: Path, components: Iterable[str]) -> list[str]:
    """Patterns of ``components`` that match nothing in ``folder`` (any alternative counts as present)."""
    missing: list[str] = []
    for c in components:
        if not any(all(any(folder.glob(p)) for p in alt) for alt in COMPONENT_FILES[c]):
            missing.extend(COMPONENT_PATTERNS[c])
    return missing


# Class names of the hub libraries' errors for "not reachable, and not in the download cache".
OFFLINE_ERRORS = {
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectionError",
    "TimeoutError",
    "Timeout",
    "NetworkError",  # modelscope
    "CacheNotFound",  # modelscope with local_files_only
}


def _advice(e: Exception, src: Source) -> str:
    """What to do about a failed download, by the kind of error (class names, so no hub library is imported)."""
    kinds = {t.__name__ for t in type(e).__mro__}
    where = "huggingface.co" if src.hub == "huggingface" else "modelscope.cn"
    login = "huggingface-cli login" if src.hub == "huggingface" else "modelscope login"
    if "GatedRepoError" in kinds:
        return f"the repository is gated: accept its licence on https://{where}/{src.name} and run `{login}`"
    if "RepositoryNotFoundError" in kinds:
        return f"no such repository on {where}, or it is private or gated and you are not logged in (`{login}`)"
    if kinds & OFFLINE_ERRORS:
        return f"offline and not in the download cache: download it once where {where} is reachable"
    return f"download it once where {where} is reachable (gated models need their licence accepted and `{login}`)"


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def resolve_model(
    source: str | Path,
    components: Iterable[str] = ALL_COMPONENTS,
    *,
    hub: HubName = DEFAULT_HUB,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    download: Downloader | None = None,
    local_files_only: bool = False,
    option: str = "--model.source",
) -> Path:
    """Return a local folder holding ``components`` of the model named by ``source``.

    Args:
        source: a local folder (or file, returned as is) or a repository id, read by :func:`parse_source`.
        components: any of ``dit``, ``ae``, ``text_encoders``, ``controlnet``; only their files are downloaded.
        hub: where a bare ``owner/name`` lives.
        download: the download function (tests substitute it); defaults to the hub's ``snapshot_download``.
        local_files_only: only look in the download cache (e.g. in DDP processes after the first fetched it).
        option: the command-line option the advice names for a local folder instead.
    """
    components = tuple(components)
    unknown = set(components) - set(COMPONENT_FILES)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {list(COMPONENT_FILES)}")
    src = parse_source(source, hub)
    if src.hub == "local":
        return Path(src.name)
    fetch = download or default_download(src.hub)
    options: dict[str, Any] = {"revision": revision, **({"local_files_only": True} if local_files_only else {})}
    if cache_dir:
        options["cache_dir"] = str(cache_dir)
    folder = None
    for depth in range(max(len(COMPONENT_FILES[c]) for c in components)):
        # the first round fetches each component's first choice; later rounds only what is still missing
        todo = [c for c in components if folder is None or missing_files(folder, [c])]
        patterns = [p for c in todo if depth < len(COMPONENT_FILES[c]) for p in COMPONENT_FILES[c][depth]]
        if not patterns:
            break
        log.info("fetching %s from %s: %s", src.name, src.hub, ", ".join(patterns))
        try:
            folder = Path(fetch(src.name, allow_patterns=patterns, **options))
        except Exception as e:
            bare = "" if str(source).startswith(tuple(PREFIXES)) else f" (nor is {src.name} a local folder)"
            offline = bool({t.__name__ for t in type(e).__mro__} & OFFLINE_ERRORS)
            what = (
                f"{src.name!r}" if offline else f"{patterns} of {src.name!r}"
            )  # offline: the inner error says no more
            inner = "" if offline else f" ({_one_line(e)})"
            raise ModelNotFoundError(
                f"could not download {what} from {src.hub}{bare}{inner}: "
                f"{_advice(e, src)}; or pass a local folder with {option} /path/to/FLUX.1-dev"
            ) from e
    assert folder is not None
    missing = missing_files(folder, components)
    if missing:
        lacking = [c for c in components if missing_files(folder, [c])]
        alternatives = [p for c in lacking for alt in COMPONENT_FILES[c][1:] for p in alt]
        raise ModelNotFoundError(
            f"the download of {src.name!r} to {folder} lacks {missing}"
            + (f" (nor has {alternatives})" if alternatives else "")
            + f"; pass a local folder in the official FLUX.1 layout with {option}"
        )
    return folder
