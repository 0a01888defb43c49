"""Loading the DiT and the autoencoder from official files, diffusers folders or single files.

Sources accepted for the DiT: a folder in the FLUX.1 layout (``flux1-dev.safetensors``,
``flux1-schnell.safetensors`` or ``flux1-kontext-dev.safetensors``), a diffusers ``transformer/`` folder
(sharded or not), the folder above it, or a single safetensors file (keys may carry a prefix such as
``model.diffusion_model.``, weights may already be
float8_e4m3fn or float8_e5m2, with or without scales: ours ``weight_scale``, ComfyUI's ``scale_weight``; fp8
weights of either kind are kept as they are, with their scale). Models are built on the meta
device and filled tensor by tensor.

A Kontext DiT has dev's tensors, so it is told by its name (:func:`is_kontext_source`): a file whose name holds
``kontext`` (``flux1-kontext-dev.safetensors``), a diffusers folder whose ``model_index.json`` (beside or above
``transformer/``) names ``FluxKontextPipeline``, or our own files' ``flux_lora.params`` metadata.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from flux_lora.dtypes import FP8_DTYPES, Quantize, check_quantize
from flux_lora.model.autoencoder import AE_PRESETS, AutoEncoder, AutoEncoderParams
from flux_lora.model.flux import PRESETS, Flux, FluxParams
from flux_lora.model.fp8 import FP8Linear, QuantPolicy, default_predicate, quantize_, quantize_weight
from flux_lora.weights.keymaps import (
    DiffusersToFlux,
    ae_diffusers_to_bfl_key,
    ae_module_pairs,
    ae_params_from_diffusers_config,
    params_from_diffusers_config,
)
from flux_lora.weights.safetensors_io import (
    CheckpointError,
    assign_tensor,
    detect_prefix,
    iter_tensors,
    meta_keys,
    read_dtypes,
    read_metadata,
    read_shapes,
    sharded_files,
    target_shapes,
)

log = logging.getLogger(__name__)

PARAMS_METADATA_KEY = "flux_lora.params"
DIT_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_DIT_MARKER = "transformer_blocks.0.attn.to_q.weight"
AE_MARKER = "decoder.conv_in.weight"


# ------------------------------------------------------------------------------------------ locating files


def find_dit_file(source: Path) -> Path:
    """The DiT checkpoint inside a model folder, or ``source`` itself when it is a file or diffusers folder."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such file or folder")
    if (source / "config.json").is_file() and any(source.glob("*.safetensors")):
        return source  # a diffusers transformer/ folder
    candidates = sorted(source.glob("flux1-*.safetensors"))
    candidates = [c for c in candidates if c.stem != "ae"]
    if candidates:
        if len(candidates) > 1:
            log.warning(
                "%s holds several DiT files %s; using %s", source, [c.name for c in candidates], candidates[0].name
            )
        return candidates[0]
    if (source / "transformer").is_dir():
        return source / "transformer"
    raise CheckpointError(
        f"{source} holds no FLUX DiT: expected flux1-dev.safetensors, flux1-schnell.safetensors or "
        "flux1-kontext-dev.safetensors "
        "(official layout) or a diffusers transformer/ folder"
    )


def find_ae_file(source: Path) -> Path:
    source = Path(source)
    if source.is_file():
        return source
    for candidate in (source / "ae.safetensors", source / "vae"):
        if candidate.exists():
            return candidate
    if (source / "config.json").is_file():
        return source
    raise CheckpointError(f"{source} holds no autoencoder: expected ae.safetensors or a diffusers vae/ folder")


# ------------------------------------------------------------------------------------------ params


def _count(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _params_from_header(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], path: Path) -> FluxParams:
    """Architecture from the file: its ``flux_lora.params`` metadata, else the tensor shapes."""
    if PARAMS_METADATA_KEY in metadata:
        return FluxParams.from_dict(json.loads(metadata[PARAMS_METADATA_KEY]))
    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        params = dict(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=_count(shapes, r"double_blocks\.(\d+)\."),
            depth_single_blocks=_count(shapes, r"single_blocks\.(\d+)\."),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except KeyError as e:
        raise CheckpointError(f"{path} is not a FLUX DiT checkpoint: key {e.args[0]!r} is missing") from None
    if head_dim != 128:
        raise CheckpointError(
            f"{path}: head size {head_dim} is not FLUX's 128 and the file has no '{PARAMS_METADATA_KEY}' metadata; "
            "pass the model params explicitly"
        )
    preset = PRESETS["flux-dev" if params["guidance_embed"] else "flux-schnell"]
    return FluxParams(**{**preset.to_dict(), **params})


def _check_variant(params: FluxParams, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    has_guidance = any(k.startswith("guidance_in.") for k in shapes)
    if params.guidance_embed and not has_guidance:
        raise CheckpointError(
            f"{path} has no guidance_in.* weights: it is a schnell-type (guidance-free) checkpoint and cannot run "
            "with dev-type (guidance-distilled) params; use the flux-schnell preset, or let the loader infer the "
            "model from the file"
        )
    if has_guidance and not params.guidance_embed:
        raise CheckpointError(
            f"{path} has guidance_in.* weights: it is a dev-type (guidance-distilled) checkpoint and cannot run "
            "with schnell-type params; use the flux-dev preset"
        )


def is_kontext_source(path: Path) -> bool:
    """Whether a DiT file or diffusers folder is FLUX.1 Kontext by its name: ``kontext`` in a file's name, or a
    ``model_index.json`` beside or above a diffusers folder naming a Kontext pipeline."""
    path = Path(path)
    if path.is_file():
        return "kontext" in path.name.lower()
    for index in (path / "model_index.json", path.parent / "model_index.json"):
        if index.is_file():
            try:
                name = str(json.loads(index.read_text()).get("_class_name", ""))
            except (OSError, ValueError, AttributeError):
                return False
            return "kontext" in name.lower()
    return False


def _with_variant(params: FluxParams, path: Path) -> FluxParams:
    """``params`` marked Kontext when the file's name says so (its tensors are dev's)."""
    if params.guidance_embed and not params.kontext and is_kontext_source(path):
        return replace(params, kontext=True)
    return params


# ------------------------------------------------------------------------------------------ streaming


def convert_diffusers_files(
    files: list[Path], conv: DiffusersToFlux, what: str, folder: Path
) -> Iterator[tuple[str, Tensor]]:
    """BFL-named tensors from diffusers-named safetensors ``files``; a key the maps lack is an error naming it."""
    for f in files:
        for key, t in iter_tensors(f):
            try:
                yield from conv.push(key, t)
            except KeyError:
                raise CheckpointError(f"{f}: unexpected key {key!r} for {what}") from None
    if conv.incomplete():
        raise CheckpointError(f"{folder}: incomplete fused layers {conv.incomplete()[:5]}")


def _dit_stream(
    path: Path, wanted: FluxParams | None
) -> tuple[FluxParams, Iterator[tuple[str, Tensor]], dict[str, Tensor], str]:
    """``(params, BFL-named tensor stream, scales stored in the file, description)``; params are inferred from the
    file unless ``wanted`` is given, which must then be of the file's variant (dev or schnell)."""
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        params = _with_variant(params_from_diffusers_config(config), path)
        if wanted is not None:
            _check_variant(wanted, {"guidance_in.": ()} if params.guidance_embed else {}, path)
            params = wanted
        files = sharded_files(path)

        stream = convert_diffusers_files(files, DiffusersToFlux(params), "a diffusers FLUX transformer", path)
        return params, stream, {}, f"diffusers folder {path}"

    shapes = read_shapes(path)
    prefix = detect_prefix(list(shapes), DIT_MARKER)
    if not prefix and DIT_MARKER not in shapes:
        if any(k.endswith(DIFFUSERS_DIT_MARKER) for k in shapes):
            raise CheckpointError(f"{path} is a diffusers-layout file: pass its transformer/ folder (with config.json)")
        raise CheckpointError(f"{path} is not a FLUX DiT checkpoint (no key ends with {DIT_MARKER!r})")
    shapes = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    params = wanted or _with_variant(_params_from_header(shapes, read_metadata(path), path), path)
    _check_variant(params, shapes, path)

    extra = {k for k in shapes if k.endswith(_QUANT_SUFFIXES) or k == "scaled_fp8"}
    scales = _quant_scales(path, prefix, extra)
    return params, iter_tensors(path, prefix, skip=lambda k: k in extra), scales, str(path)


# Scale keys of pre-quantized files: ours (weight_scale, per channel), ComfyUI's scaled fp8 (scale_weight,
# scale_input) and ComfyUI's comfy_quant layout (weight_scale per tensor, input_scale, comfy_quant = JSON bytes).
_QUANT_SUFFIXES = (".weight_scale", ".scale_weight", ".scale_input", ".input_scale", ".comfy_quant")
_COMFY_QUANT_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def _quant_scales(path: Path, prefix: str, extra: set[str]) -> dict[str, Tensor]:
    """``weight key -> scale`` from the scale keys ``extra``; a comfy_quant format we cannot run is an error."""
    scales: dict[str, Tensor] = {}
    for key, t in iter_tensors(path, prefix, skip=lambda k: k not in extra) if extra else ():
        if key.endswith(".weight_scale"):
            scales[key.removesuffix("_scale")] = t.float()
        elif key.endswith(".scale_weight"):
            scales[key.removesuffix(".scale_weight") + ".weight"] = t.float().reshape(-1)
        elif key.endswith(".comfy_quant"):
            _check_comfy_quant(path, key, t)
    return scales


def _check_comfy_quant(path: Path, key: str, t: Tensor) -> None:
    try:
        fmt = json.loads(bytes(t.to(torch.uint8).tolist()).decode()).get("format")
    except (ValueError, AttributeError):
        raise CheckpointError(f"{path}: {key!r} is not a ComfyUI comfy_quant JSON object") from None
    if fmt not in _COMFY_QUANT_FORMATS:
        raise CheckpointError(
            f"{path}: ComfyUI comfy_quant layout with format {fmt!r} at {key!r}; only "
            f"{', '.join(_COMFY_QUANT_FORMATS)} (scaled per tensor) are read. Use a bf16 or fp8 checkpoint"
        )


def flux_params(source: str | Path | FluxParams) -> FluxParams:
    """Which FLUX architecture: ``source`` itself when it is :class:`FluxParams`, a preset by name (``flux-dev``,
    ``flux-schnell``, ``flux-kontext-dev``, ``tiny``, ``tiny-schnell``, ``tiny-kontext``), or the architecture of
    the DiT at a path (model folder, diffusers folder or file), read from its headers only."""
    if isinstance(source, FluxParams):
        return source
    if isinstance(source, str) and source in PRESETS:
        return PRESETS[source]
    if not Path(source).exists():
        raise ValueError(f"{source!r} is neither a model preset ({', '.join(sorted(PRESETS))}) nor an existing path")
    return _dit_stream(find_dit_file(Path(source)), None)[0]


def load_flow_model(
    source: str | Path,
    params: str | FluxParams | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: Quantize | None = None,
    quant_policy: QuantPolicy = "blocks",
    per_channel_scale: bool = True,
) -> Flux:
    """Build the DiT on the meta device and stream its weights in (quantizing each one on arrival).

    Args:
        source: model folder, diffusers ``transformer/`` folder, or single safetensors file.
        params: preset name or params; by default inferred from the file. Must match the file.
        dtype: dtype of the weights kept in floating point (and compute dtype of fp8 layers' biases).
        quantize: ``"float8_e4m3fn"`` to store the selected Linears in fp8; layers already stored in fp8 in the
            file stay fp8 in any case.
        quant_policy: which Linears ``quantize`` selects (see :func:`default_predicate`).

    Returns:
        The frozen model in eval mode on ``device``.
    """
    check_quantize(quantize)
    path = find_dit_file(Path(source))
    params, stream, scales, desc = _dit_stream(path, None if params is None else flux_params(params))

    with torch.device("meta"):
        model = Flux(params)
    fp8_in_file = set()
    if not path.is_dir():
        dtypes = read_dtypes(path)
        prefix = detect_prefix(list(dtypes), DIT_MARKER)
        fp8_in_file = {
            k[len(prefix) :].removesuffix(".weight")
            for k, d in dtypes.items()
            if d in ("F8_E4M3", "F8_E5M2") and k.endswith(".weight")
        }
    policy = default_predicate(quant_policy) if quantize else (lambda n, m: False)
    quantize_(model, lambda n, m: policy(n, m) or n in fp8_in_file, per_channel=per_channel_scale)

    stream_into(model, stream, desc, dtype, device, per_channel_scale, scales)
    model.requires_grad_(False)
    return model.eval()


def _assign_tensor(
    model: nn.Module,
    key: str,
    tensor: Tensor,
    scales: dict[str, Tensor],
    dtype: torch.dtype,
    device: str | torch.device,
    per_channel: bool,
) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, FP8Linear) and attr == "weight":
        tensor = tensor.to(device)
        if tensor.dtype in FP8_DTYPES:  # the file's own bytes and scale (e5m2 too: re-encoding would round twice)
            scale = scales.get(key, torch.ones(()))
            scale = scale.to(device).float().expand(tensor.shape[0]).clone()
        else:
            tensor, scale = quantize_weight(tensor, per_channel)
        assign_tensor(model, key, tensor)
        module.weight_scale = scale
        return
    if isinstance(module, FP8Linear) and attr == "weight_scale":
        return  # set together with the weight
    if tensor.dtype in FP8_DTYPES:  # an fp8 tensor the model keeps in float (e.g. a norm scale)
        tensor = _dequantized(tensor, scales.get(key))
    assign_tensor(model, key, tensor.to(device=device, dtype=dtype))


def _dequantized(tensor: Tensor, scale: Tensor | None) -> Tensor:
    """An fp8 tensor of any fp8 dtype times its stored scale (scalar or one per output row), in float32."""
    out = tensor.float()
    if scale is None:
        return out
    scale = scale.to(out.device).float()
    return out * (scale.reshape(-1, *([1] * (out.ndim - 1))) if scale.numel() > 1 else scale.reshape(()))


# ------------------------------------------------------------------------------------------ autoencoder


def infer_ae_params(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], path: Path) -> AutoEncoderParams:
    if PARAMS_METADATA_KEY in metadata:
        return AutoEncoderParams.from_dict(json.loads(metadata[PARAMS_METADATA_KEY]))
    try:
        ch = shapes["encoder.conv_in.weight"][0]
        levels = _count(shapes, r"encoder\.down\.(\d+)\.")
        ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        return AutoEncoderParams(
            in_channels=shapes["encoder.conv_in.weight"][1],
            ch=ch,
            out_ch=shapes["decoder.conv_out.weight"][0],
            ch_mult=ch_mult,
            num_res_blocks=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
            z_channels=shapes["decoder.conv_in.weight"][1],
        )
    except KeyError as e:
        raise CheckpointError(f"{path} is not a FLUX autoencoder: key {e.args[0]!r} is missing") from None


def load_autoencoder(
    source: str | Path,
    params: str | AutoEncoderParams | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> AutoEncoder:
    """Load ``ae.safetensors`` (BFL names) or a diffusers ``vae/`` folder into :class:`AutoEncoder`."""
    path = find_ae_file(Path(source))
    if path.is_dir():
        file_params = ae_params_from_diffusers_config(json.loads((path / "config.json").read_text()))
        table = {d: b for b, d in ae_module_pairs(file_params)}
        files = sharded_files(path)
        stream: Iterator[tuple[str, Tensor]] = (
            ae_diffusers_to_bfl_key(k, t, table) for f in files for k, t in iter_tensors(f)
        )
    else:
        shapes = read_shapes(path)
        prefix = detect_prefix(list(shapes), AE_MARKER)
        shapes = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
        file_params = infer_ae_params(shapes, read_metadata(path), path)
        stream = iter_tensors(path, prefix)
    if isinstance(params, str):
        params = AE_PRESETS[params]
    params = params or file_params
    with torch.device("meta"):
        model = AutoEncoder(params)
    stream_into(model, stream, str(path), dtype, device)
    model.requires_grad_(False)
    return model.eval()


def stream_into(
    model: nn.Module,
    stream: Iterator[tuple[str, Tensor]],
    desc: str,
    dtype: torch.dtype,
    device: str | torch.device,
    per_channel: bool = True,
    scales: dict[str, Tensor] | None = None,
) -> None:
    """Fill a meta-built ``model`` from ``(key, tensor)`` pairs with strict key and shape matching: the one loading
    loop of every model (DiT, autoencoder, ControlNet).

    Float tensors are cast to ``dtype``; weights of :class:`FP8Linear` modules are quantized on arrival, or kept as
    they are when the file stores them in fp8 (with their ``scales`` by weight key, from the file).
    """
    expected = target_shapes(model)
    unexpected = []
    for key, tensor in stream:
        if key not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[key][0]):
            raise CheckpointError(
                f"{desc}: key {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key][0])}"
            )
        _assign_tensor(model, key, tensor, scales or {}, dtype, device, per_channel)
    if unexpected:
        raise CheckpointError(f"{desc}: unexpected keys {unexpected[:5]} ({len(unexpected)} in all)")
    missing = meta_keys(model)
    if missing:
        raise CheckpointError(f"{desc}: missing keys {missing[:5]} ({len(missing)} in all)")
