"""FLUX ControlNets from the diffusers layout: ``config.json`` + ``diffusion_pytorch_model.safetensors``.

The architecture comes from ``config.json`` (block counts, width, union ``num_mode``, alimama's
``extra_condition_channels``). The weights (one file, or an index and shards) stream into a model built on the
meta device through a declarative key map (the DiT's own map for the embedders and blocks, plus the
ControlNet's extra layers) with strict key and shape matching, and are quantized to float8_e4m3fn on arrival
if asked.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flux_lora.dtypes import Quantize, check_quantize
from flux_lora.model.controlnet import ControlNetParams, FluxControlNet
from flux_lora.model.fp8 import QuantPolicy, default_predicate, quantize_
from flux_lora.weights.hub import DEFAULT_HUB, Downloader, HubName, ModelNotFoundError, resolve_model
from flux_lora.weights.keymaps import (
    DiffusersToFlux,
    LinearMap,
    TensorMap,
    flux_linear_maps,
    flux_tensor_maps,
    flux_to_diffusers_config,
    maps_to_diffusers,
    params_from_diffusers_config,
)
from flux_lora.weights.loading import convert_diffusers_files, stream_into
from flux_lora.weights.safetensors_io import CheckpointError, sharded_files

log = logging.getLogger(__name__)

CONTROLNET_CLASS = "FluxControlNetModel"
# Every config key a FLUX ControlNet folder may carry (diffusers' FluxControlNetModel arguments, plus
# alimama's extra_condition_channels). Keys starting with "_" are bookkeeping and ignored.
CONFIG_KEYS = frozenset(
    {
        "patch_size",
        "in_channels",
        "num_layers",
        "num_single_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "pooled_projection_dim",
        "guidance_embeds",
        "axes_dims_rope",
        "num_mode",
        "conditioning_embedding_channels",
        "extra_condition_channels",
    }
)

Resolver = Callable[[str], Path]


# ------------------------------------------------------------------------------------------ config


def _check_config_kind(cfg: dict[str, Any], source: str) -> None:
    cls = cfg.get("_class_name", CONTROLNET_CLASS)
    if cls != CONTROLNET_CLASS:
        hint = " (that is a FLUX DiT, not a ControlNet)" if cls == "FluxTransformer2DModel" else ""
        raise CheckpointError(
            f"{source}: _class_name {cls!r} is not a FLUX ControlNet{hint}; expected {CONTROLNET_CLASS}"
        )
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in CONFIG_KEYS)
    if unknown:
        raise CheckpointError(
            f"{source}: unknown config keys {unknown}; a FLUX ControlNet config has {sorted(CONFIG_KEYS)}"
        )
    if cfg.get("conditioning_embedding_channels") is not None:
        raise CheckpointError(
            f"{source}: conditioning_embedding_channels={cfg['conditioning_embedding_channels']} marks a "
            "ControlNet with a pixel-space hint encoder (XLabs style), which is not supported; the supported "
            "ControlNets (InstantX, jasperai, alimama) take autoencoder latents"
        )


def controlnet_params_from_config(cfg: dict[str, Any], source: str = "config.json") -> ControlNetParams:
    """A diffusers ControlNet ``config.json`` -> :class:`ControlNetParams` (absent keys: the defaults)."""
    _check_config_kind(cfg, source)
    try:
        return ControlNetParams(
            trunk=params_from_diffusers_config(cfg),
            extra_channels=cfg.get("extra_condition_channels") or 0,
            num_modes=cfg.get("num_mode"),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: not a usable FLUX ControlNet config: {e}") from None


def controlnet_config(p: ControlNetParams) -> dict[str, Any]:
    """:class:`ControlNetParams` -> the diffusers ``config.json`` content.

    ``extra_condition_channels`` is written only when non-zero, as in the alimama configs; diffusers' own
    class does not know that key.
    """
    trunk = flux_to_diffusers_config(p.trunk)
    del trunk["out_channels"]  # a ControlNet has no output layer
    cfg = dict(_class_name=CONTROLNET_CLASS, **trunk, num_mode=p.num_modes, conditioning_embedding_channels=None)
    cfg["axes_dims_rope"] = list(cfg["axes_dims_rope"])
    if p.extra_channels:
        cfg["extra_condition_channels"] = p.extra_channels
    return cfg


# ------------------------------------------------------------------------------------------ key maps


def controlnet_linear_maps(p: ControlNetParams) -> list[LinearMap]:
    """Every Linear of the ControlNet: the DiT's embedders and blocks (no final layer), then its own."""
    maps = [m for m in flux_linear_maps(p.trunk) if not m.bfl.startswith("final_layer.")]
    maps.append(LinearMap("control_in", ("controlnet_x_embedder",)))
    maps += [LinearMap(f"controlnet_blocks.{i}", (f"controlnet_blocks.{i}",)) for i in range(p.trunk.depth)]
    maps += [
        LinearMap(f"controlnet_single_blocks.{i}", (f"controlnet_single_blocks.{i}",))
        for i in range(p.trunk.depth_single_blocks)
    ]
    return maps


def controlnet_tensor_maps(p: ControlNetParams) -> list[TensorMap]:
    """The non-Linear tensors: the blocks' QK-norm scales and the union mode embedding."""
    maps = flux_tensor_maps(p.trunk)
    if p.is_union:
        maps.append(TensorMap("mode_embedder.weight", "controlnet_mode_embedder.weight"))
    return maps


def controlnet_to_diffusers(sd: dict[str, Tensor], p: ControlNetParams) -> dict[str, Tensor]:
    """Our ControlNet state dict -> diffusers ``FluxControlNetModel`` names (every key must be consumed)."""
    return maps_to_diffusers(sd, controlnet_linear_maps(p), controlnet_tensor_maps(p))


# ------------------------------------------------------------------------------------------ loading


def resolve_controlnet(source: str | Path, download: Downloader | None = None, hub: HubName = DEFAULT_HUB) -> Path:
    """The default resolver: a local path as is, or a repository id read by :func:`flux_lora.weights.hub.parse_source`
    (``hf:InstantX/FLUX.1-dev-Controlnet-Union``, ``ms:...``, or a bare id on ``hub``), downloaded through
    :func:`flux_lora.weights.hub.resolve_model`."""
    try:
        return resolve_model(source, ["controlnet"], hub=hub, download=download)
    except ModelNotFoundError as e:
        reason = re.split(r"; or pass|; pass", str(e))[0]  # the hub's advice is for FLUX.1 model folders
        raise CheckpointError(
            f"ControlNet {str(source)!r} is neither a local folder nor could it be downloaded "
            f"({reason}); pass a local folder holding config.json and "
            "diffusion_pytorch_model.safetensors"
        ) from e


def find_controlnet_folder(path: Path) -> Path:
    """The folder holding the ControlNet's ``config.json``: ``path`` itself, its ``controlnet/`` subfolder,
    or the folder of a file inside it."""
    if path.is_file():
        path = path.parent
    for candidate in (path, path / "controlnet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{path} holds no config.json: a diffusers-layout ControlNet folder holds config.json "
        "and diffusion_pytorch_model.safetensors (or an index and shards)"
    )


def read_controlnet_params(folder: Path) -> ControlNetParams:
    config = folder / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON ({e})") from None
    return controlnet_params_from_config(cfg, str(config))


def load_controlnet(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: Quantize | None = None,
    quant_policy: QuantPolicy = "blocks",
    resolve: Resolver | None = None,
) -> FluxControlNet:
    """Load a FLUX ControlNet from a diffusers-layout folder (or a model id, through ``resolve``).

    Args:
        source: a local folder, or what ``resolve`` takes (``InstantX/FLUX.1-dev-Controlnet-Union-alpha``).
        dtype: the float dtype of every tensor not stored in fp8.
        quantize: ``"float8_e4m3fn"`` stores the selected Linear weights in fp8 (computed in the input dtype).
        quant_policy: ``"blocks"`` (the double and single blocks, as for the DiT) or ``"all"`` Linears.
        resolve: turns ``source`` into a local path; default :func:`resolve_controlnet` (local or ModelScope).
    """
    check_quantize(quantize)
    folder = find_controlnet_folder((resolve or resolve_controlnet)(str(source)))
    params = read_controlnet_params(folder)
    with torch.device("meta"):
        model = FluxControlNet(params)
    if quantize:
        quantize_(model, default_predicate(quant_policy))
    conv = DiffusersToFlux(None, controlnet_linear_maps(params), controlnet_tensor_maps(params))
    what = f"the ControlNet in {folder / 'config.json'}"
    stream = convert_diffusers_files(sharded_files(folder), conv, what, folder)
    stream_into(model, stream, f"ControlNet folder {folder}", dtype, device)
    log.info(
        "loaded ControlNet %s: %d double + %d single blocks%s%s%s",
        folder,
        params.trunk.depth,
        params.trunk.depth_single_blocks,
        f", {params.num_modes} union modes" if params.is_union else "",
        ", inpainting (mask input)" if params.is_inpainting else "",
        ", fp8" if quantize else "",
    )
    model.requires_grad_(False)
    return model.eval()
