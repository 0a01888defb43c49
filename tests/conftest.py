"""Shared fixtures: tiny model folders written by the project's own writer, loaded by the real loaders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from flux_lora.weights.tiny import write_tiny_controlnet, write_tiny_model


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: a thread pool costs far more than the work itself (and CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def tiny_dev_dir(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev folder in the official layout (DiT, AE, CLIP, T5, tokenizers)."""
    logging.getLogger("flux_lora").setLevel(logging.INFO)
    return write_tiny_model(tmp_path_factory.mktemp("tiny-dev"), variant="dev", seed=0)


@pytest.fixture(scope="session")
def tiny_schnell_dir(tmp_path_factory) -> Path:
    """A tiny FLUX.1-schnell folder in the official layout."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-schnell"), variant="schnell", seed=1)


@pytest.fixture(scope="session")
def tiny_controlnet_dir(tmp_path_factory) -> Path:
    """A tiny ControlNet for the tiny dev DiT in the diffusers layout, with random (non-zero) outputs."""
    return write_tiny_controlnet(tmp_path_factory.mktemp("tiny") / "controlnet", union=False, seed=0)


@pytest.fixture(scope="session")
def tiny_union_controlnet_dir(tmp_path_factory) -> Path:
    """A tiny union ControlNet (10 modes, as InstantX's) for the tiny dev DiT."""
    return write_tiny_controlnet(tmp_path_factory.mktemp("tiny") / "controlnet-union", union=True, seed=0)
