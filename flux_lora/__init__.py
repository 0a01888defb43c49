"""flux-lora: LoRA fine-tuning and inference for FLUX.1 on a float8 base.

The public API, re-exported here (importing it has no side effects)::

    from flux_lora import FluxPipeline, read_lora, apply_loras

    pipe = FluxPipeline.from_pretrained("/models/FLUX.1-dev", quantize="float8_e4m3fn", offload="model")
    apply_loras(pipe.dit, [(read_lora("my_lora.safetensors", pipe.dit.params), 0.8, "mine")])

Where things live: ``model/`` (the networks), ``weights/`` (files, loading, downloads), ``lora/`` (LoRA weights,
file layouts, training adapters, run-time application), ``data/`` (scan, buckets, cache), ``inference/``
(pipeline, ControlNets, offload) and ``training/`` (Lightning module and run); ``config.py`` is the experiment
configuration and ``sampling.py`` the flow-matching math both sides share.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flux_lora.config import ExperimentConfig, load_config, save_config
    from flux_lora.dtypes import Quantize
    from flux_lora.inference.control import ControlNetUnit
    from flux_lora.inference.pipeline import FluxPipeline
    from flux_lora.lora.files import read_lora, write_lora
    from flux_lora.lora.runtime import apply_loras, remove_loras, set_lora_scale, unfuse_loras
    from flux_lora.lora.weight import LoraStateDict, LoraWeight
    from flux_lora.model.autoencoder import AutoEncoder
    from flux_lora.model.flux import PRESETS, Flux, FluxParams
    from flux_lora.model.fp8 import FP8Linear, quantize_
    from flux_lora.model.text_encoders import TextEmbeddings, TextEncoders
    from flux_lora.weights.controlnet_loading import load_controlnet
    from flux_lora.weights.loading import flux_params, load_autoencoder, load_flow_model

# Where each public name lives: imported on first use (PEP 562), so ``import flux_lora.config`` or
# ``train.py --help`` do not import torch.
_HOMES = {
    "ExperimentConfig": "flux_lora.config",
    "load_config": "flux_lora.config",
    "save_config": "flux_lora.config",
    "Quantize": "flux_lora.dtypes",
    "ControlNetUnit": "flux_lora.inference.control",
    "FluxPipeline": "flux_lora.inference.pipeline",
    "read_lora": "flux_lora.lora.files",
    "write_lora": "flux_lora.lora.files",
    "apply_loras": "flux_lora.lora.runtime",
    "remove_loras": "flux_lora.lora.runtime",
    "set_lora_scale": "flux_lora.lora.runtime",
    "unfuse_loras": "flux_lora.lora.runtime",
    "LoraStateDict": "flux_lora.lora.weight",
    "LoraWeight": "flux_lora.lora.weight",
    "AutoEncoder": "flux_lora.model.autoencoder",
    "PRESETS": "flux_lora.model.flux",
    "Flux": "flux_lora.model.flux",
    "FluxParams": "flux_lora.model.flux",
    "FP8Linear": "flux_lora.model.fp8",
    "quantize_": "flux_lora.model.fp8",
    "TextEmbeddings": "flux_lora.model.text_encoders",
    "TextEncoders": "flux_lora.model.text_encoders",
    "load_controlnet": "flux_lora.weights.controlnet_loading",
    "flux_params": "flux_lora.weights.loading",
    "load_autoencoder": "flux_lora.weights.loading",
    "load_flow_model": "flux_lora.weights.loading",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'flux_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "PRESETS",
    "AutoEncoder",
    "ControlNetUnit",
    "ExperimentConfig",
    "FP8Linear",
    "Flux",
    "FluxParams",
    "FluxPipeline",
    "LoraStateDict",
    "LoraWeight",
    "Quantize",
    "TextEmbeddings",
    "TextEncoders",
    "apply_loras",
    "flux_params",
    "load_autoencoder",
    "load_config",
    "load_controlnet",
    "load_flow_model",
    "quantize_",
    "read_lora",
    "remove_loras",
    "save_config",
    "set_lora_scale",
    "unfuse_loras",
    "write_lora",
]
