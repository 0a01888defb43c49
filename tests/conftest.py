"""Shared fixtures: tiny model folders written by the project's own writer, loaded by the real loaders, and tiny
pipelines built from them once per session. A test that changes a shared pipeline (LoRAs, offload, hooks) puts
it back as it was, in a ``finally`` or a fixture's teardown, or builds its own."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.weights.tiny import write_tiny_controlnet, write_tiny_model

from helpers.offload import realign


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


@pytest.fixture(scope="session")
def dev_pipe(tiny_dev_dir) -> FluxPipeline:
    """The tiny dev pipeline, float32 on the CPU, with freshly allocated tensors: runs under the fake accelerator
    are bit-equal to plain ones (see ``helpers.offload.realign``)."""
    pipe = FluxPipeline.from_pretrained(tiny_dev_dir, dtype=torch.float32, device="cpu")
    for module in (pipe.dit, pipe.ae, pipe.text_encoders):
        realign(module)
    return pipe


@pytest.fixture(scope="session")
def schnell_pipe(tiny_schnell_dir) -> FluxPipeline:
    """The tiny schnell pipeline, float32 on the CPU."""
    return FluxPipeline.from_pretrained(tiny_schnell_dir, dtype=torch.float32, device="cpu")
