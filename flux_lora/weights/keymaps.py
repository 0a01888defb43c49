"""Declarative maps between BFL names (ours) and diffusers names, for the DiT and the autoencoder.

The DiT map is a list of :class:`LinearMap` (one BFL Linear <-> one or more diffusers Linears, split by output rows,
or with the two halves of the rows swapped for the final adaLN) and :class:`TensorMap` (plain renames). Weights,
biases and LoRA ``B`` matrices all follow the same row rules, so the LoRA converters reuse this table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flux_lora.model.autoencoder import AutoEncoderParams
from flux_lora.model.flux import FluxParams


@dataclass(frozen=True)
class LinearMap:
    """A BFL Linear and its diffusers counterpart(s).

    ``diffusers`` lists one module per row block of the BFL weight, with ``sizes`` giving each block's rows.
    ``swap_halves``: one diffusers module whose rows are the BFL halves swapped (BFL [shift; scale] vs
    diffusers [scale; shift] in the final adaLN).
    """

    bfl: str
    diffusers: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    swap_halves: bool = False

    @property
    def is_split(self) -> bool:
        return len(self.diffusers) > 1

    def to_diffusers_rows(self, t: Tensor) -> list[Tensor]:
        """Rows of a BFL tensor (weight, bias or LoRA B) -> one tensor per diffusers module."""
        if self.swap_halves:
            first, second = t.chunk(2, dim=0)
            return [torch.cat([second, first], dim=0)]
        if self.is_split:
            return list(torch.split(t, list(self.sizes), dim=0))
        return [t]

    def to_bfl_rows(self, parts: list[Tensor]) -> Tensor:
        """Inverse of :meth:`to_diffusers_rows`."""
        if self.swap_halves:
            first, second = parts[0].chunk(2, dim=0)
            return torch.cat([second, first], dim=0)
        return torch.cat(parts, dim=0) if self.is_split else parts[0]


@dataclass(frozen=True)
class TensorMap:
    bfl: str
    diffusers: str


def flux_linear_maps(p: FluxParams) -> list[LinearMap]:
    """Every Linear of the DiT, derived from its params (no hard-coded widths or depths)."""
    d, mlp = p.hidden_size, p.mlp_hidden_dim
    maps = [
        LinearMap("img_in", ("x_embedder",)),
        LinearMap("txt_in", ("context_embedder",)),
        LinearMap("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        LinearMap("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        LinearMap("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        LinearMap("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ]
    if p.guidance_embed:
        maps += [
            LinearMap("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            LinearMap("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    for i in range(p.depth):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        maps += [
            LinearMap(f"{b}.img_mod.lin", (f"{t}.norm1.linear",)),
            LinearMap(f"{b}.txt_mod.lin", (f"{t}.norm1_context.linear",)),
            LinearMap(f"{b}.img_attn.qkv", (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"), (d, d, d)),
            LinearMap(
                f"{b}.txt_attn.qkv", (f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"), (d, d, d)
            ),
            LinearMap(f"{b}.img_attn.proj", (f"{t}.attn.to_out.0",)),
            LinearMap(f"{b}.txt_attn.proj", (f"{t}.attn.to_add_out",)),
            LinearMap(f"{b}.img_mlp.0", (f"{t}.ff.net.0.proj",)),
            LinearMap(f"{b}.img_mlp.2", (f"{t}.ff.net.2",)),
            LinearMap(f"{b}.txt_mlp.0", (f"{t}.ff_context.net.0.proj",)),
            LinearMap(f"{b}.txt_mlp.2", (f"{t}.ff_context.net.2",)),
        ]
    for i in range(p.depth_single_blocks):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        maps += [
            LinearMap(f"{b}.modulation.lin", (f"{t}.norm.linear",)),
            LinearMap(
                f"{b}.linear1", (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"), (d, d, d, mlp)
            ),
            LinearMap(f"{b}.linear2", (f"{t}.proj_out",)),
        ]
    maps += [
        LinearMap("final_layer.linear", ("proj_out",)),
        LinearMap("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    return maps


def flux_tensor_maps(p: FluxParams) -> list[TensorMap]:
    """The non-Linear tensors of the DiT: the QK-norm scales."""
    maps = []
    for i in range(p.depth):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        maps += [
            TensorMap(f"{b}.img_attn.norm.query_norm.scale", f"{t}.norm_q.weight"),
            TensorMap(f"{b}.img_attn.norm.key_norm.scale", f"{t}.norm_k.weight"),
            TensorMap(f"{b}.txt_attn.norm.query_norm.scale", f"{t}.norm_added_q.weight"),
            TensorMap(f"{b}.txt_attn.norm.key_norm.scale", f"{t}.norm_added_k.weight"),
        ]
    for i in range(p.depth_single_blocks):
        b, t = f"single_blocks.{i}.norm", f"single_transformer_blocks.{i}.attn"
        maps += [
            TensorMap(f"{b}.query_norm.scale", f"{t}.norm_q.weight"),
            TensorMap(f"{b}.key_norm.scale", f"{t}.norm_k.weight"),
        ]
    return maps


def flux_to_diffusers(sd: dict[str, Tensor], p: FluxParams) -> dict[str, Tensor]:
    """A BFL DiT state dict -> diffusers ``FluxTransformer2DModel`` names (every key must be consumed)."""
    return maps_to_diffusers(sd, flux_linear_maps(p), flux_tensor_maps(p))


def maps_to_diffusers(
    sd: dict[str, Tensor], linear_maps: list[LinearMap], tensor_maps: list[TensorMap]
) -> dict[str, Tensor]:
    """A BFL-named state dict -> diffusers names through the given maps (every key must be consumed)."""
    out: dict[str, Tensor] = {}
    rest = dict(sd)
    for m in linear_maps:
        for suffix in ("weight", "bias"):
            key = f"{m.bfl}.{suffix}"
            if key in rest:
                for name, part in zip(m.diffusers, m.to_diffusers_rows(rest.pop(key)), strict=True):
                    out[f"{name}.{suffix}"] = part.contiguous()
    for t in tensor_maps:
        out[t.diffusers] = rest.pop(t.bfl)
    if rest:
        raise KeyError(f"keys with no diffusers counterpart: {sorted(rest)[:5]}")
    return out


class DiffusersToFlux:
    """Streams diffusers DiT tensors in, yields BFL ``(key, tensor)`` pairs as soon as each is complete.

    Fused BFL Linears need all their diffusers parts; parts are held only until their group is complete, so a
    sharded checkpoint converts with at most one Linear's parts pending per shard boundary.
    """

    def __init__(
        self,
        p: FluxParams | None,
        linear_maps: list[LinearMap] | None = None,
        tensor_maps: list[TensorMap] | None = None,
    ):
        """Maps of the DiT with params ``p``, or the given ``linear_maps`` / ``tensor_maps`` (e.g. a ControlNet's)."""
        self._targets: dict[str, tuple[str, LinearMap | TensorMap, int]] = {}
        if p is not None:
            linear_maps = flux_linear_maps(p) if linear_maps is None else linear_maps
            tensor_maps = flux_tensor_maps(p) if tensor_maps is None else tensor_maps
        if linear_maps is None or tensor_maps is None:
            raise ValueError("DiffusersToFlux needs the DiT's params or both maps")
        for m in linear_maps:
            for suffix in ("weight", "bias"):
                for idx, name in enumerate(m.diffusers):
                    self._targets[f"{name}.{suffix}"] = (suffix, m, idx)
        for t in tensor_maps:
            self._targets[t.diffusers] = ("", t, 0)
        self._pending: dict[str, dict[int, Tensor]] = {}

    def push(self, key: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
        if key not in self._targets:
            raise KeyError(key)
        suffix, m, idx = self._targets[key]
        if isinstance(m, TensorMap):
            yield m.bfl, tensor
            return
        bfl_key = f"{m.bfl}.{suffix}"
        parts = self._pending.setdefault(bfl_key, {})
        parts[idx] = tensor
        if len(parts) == len(m.diffusers):
            del self._pending[bfl_key]
            yield bfl_key, m.to_bfl_rows([parts[i] for i in range(len(m.diffusers))])

    def incomplete(self) -> list[str]:
        return sorted(self._pending)


def params_from_diffusers_config(cfg: dict[str, Any]) -> FluxParams:
    """A diffusers ``transformer/config.json`` -> :class:`FluxParams`."""
    heads, head_dim = cfg.get("num_attention_heads", 24), cfg.get("attention_head_dim", 128)
    if cfg.get("patch_size", 1) != 1:
        raise ValueError(f"patch_size {cfg['patch_size']} is not supported (FLUX.1 uses 1)")
    guidance = bool(cfg.get("guidance_embeds", False))
    return FluxParams(
        in_channels=cfg.get("in_channels", 64),
        out_channels=cfg.get("out_channels") or cfg.get("in_channels", 64),
        vec_in_dim=cfg.get("pooled_projection_dim", 768),
        context_in_dim=cfg.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim,
        mlp_ratio=4.0,
        num_heads=heads,
        depth=cfg.get("num_layers", 19),
        depth_single_blocks=cfg.get("num_single_layers", 38),
        axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=guidance,
        max_sequence_length=512 if guidance else 256,
        default_steps=28 if guidance else 4,
        shift_schedule=guidance,
    )


def flux_to_diffusers_config(p: FluxParams) -> dict[str, Any]:
    """:class:`FluxParams` -> keyword arguments of diffusers' ``FluxTransformer2DModel``."""
    if p.mlp_ratio != 4.0:
        raise ValueError("diffusers' FluxTransformer2DModel fixes mlp_ratio at 4")
    return dict(
        patch_size=1,
        in_channels=p.in_channels,
        out_channels=p.out_channels,
        num_layers=p.depth,
        num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=p.guidance_embed,
        axes_dims_rope=tuple(p.axes_dim),
    )


# ----------------------------------------------------------------------------------------------- autoencoder


def _ae_resnet(bfl: str, diff: str) -> list[tuple[str, str]]:
    names = [
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("nin_shortcut", "conv_shortcut"),
    ]
    return [(f"{bfl}.{b}", f"{diff}.{d}") for b, d in names]


def _ae_mid(bfl: str, diff: str) -> list[tuple[str, str]]:
    pairs = _ae_resnet(f"{bfl}.block_1", f"{diff}.resnets.0") + _ae_resnet(f"{bfl}.block_2", f"{diff}.resnets.1")
    attn = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
    return pairs + [(f"{bfl}.attn_1.{b}", f"{diff}.attentions.0.{d}") for b, d in attn]


def ae_module_pairs(p: AutoEncoderParams) -> list[tuple[str, str]]:
    """``(BFL module, diffusers module)`` for every module of the autoencoder that holds weights."""
    n = len(p.ch_mult)
    pairs = [
        ("encoder.conv_in", "encoder.conv_in"),
        ("encoder.norm_out", "encoder.conv_norm_out"),
        ("encoder.conv_out", "encoder.conv_out"),
        ("decoder.conv_in", "decoder.conv_in"),
        ("decoder.norm_out", "decoder.conv_norm_out"),
        ("decoder.conv_out", "decoder.conv_out"),
    ]
    for i in range(n):
        for j in range(p.num_res_blocks):
            pairs += _ae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i != n - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        up = n - 1 - i  # diffusers numbers decoder levels from the bottom
        for j in range(p.num_res_blocks + 1):
            pairs += _ae_resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}")
        if i != 0:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    pairs += _ae_mid("encoder.mid", "encoder.mid_block") + _ae_mid("decoder.mid", "decoder.mid_block")
    return pairs


_AE_ATTN_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")


def ae_diffusers_to_bfl_key(key: str, tensor: Tensor, table: dict[str, str]) -> tuple[str, Tensor]:
    """Rename one diffusers ``AutoencoderKL`` tensor; its 1x1 attention Linears become 1x1 convs."""
    module, _, suffix = key.rpartition(".")
    if module not in table:
        raise KeyError(key)
    if module.endswith(_AE_ATTN_LINEARS) and suffix == "weight" and tensor.ndim == 2:
        tensor = tensor[:, :, None, None]
    return f"{table[module]}.{suffix}", tensor


def ae_to_diffusers(sd: dict[str, Tensor], p: AutoEncoderParams) -> dict[str, Tensor]:
    """A BFL autoencoder state dict -> diffusers ``AutoencoderKL`` names."""
    table = dict(ae_module_pairs(p))
    out = {}
    for key, t in sd.items():
        module, _, suffix = key.rpartition(".")
        if module not in table:
            raise KeyError(f"autoencoder key {key!r} has no diffusers counterpart")
        diff = table[module]
        if diff.endswith(_AE_ATTN_LINEARS) and suffix == "weight":
            t = t[:, :, 0, 0]
        out[f"{diff}.{suffix}"] = t
    return out


def ae_params_from_diffusers_config(cfg: dict[str, Any]) -> AutoEncoderParams:
    """A diffusers ``vae/config.json`` -> :class:`AutoEncoderParams`."""
    chans = list(cfg.get("block_out_channels", [128, 256, 512, 512]))
    if cfg.get("use_quant_conv", False) or cfg.get("use_post_quant_conv", False):
        raise ValueError("this VAE uses quant_conv layers; the FLUX autoencoder has none")
    if cfg.get("norm_num_groups", 32) != 32:
        raise ValueError(f"norm_num_groups must be 32, got {cfg['norm_num_groups']}")
    return AutoEncoderParams(
        in_channels=cfg.get("in_channels", 3),
        out_ch=cfg.get("out_channels", 3),
        ch=chans[0],
        ch_mult=tuple(c // chans[0] for c in chans),
        num_res_blocks=cfg.get("layers_per_block", 2),
        z_channels=cfg.get("latent_channels", 16),
        scale_factor=cfg.get("scaling_factor", 0.3611),
        shift_factor=cfg.get("shift_factor", 0.1159) or 0.0,
    )


def ae_to_diffusers_config(p: AutoEncoderParams) -> dict[str, Any]:
    """:class:`AutoEncoderParams` -> keyword arguments of diffusers' ``AutoencoderKL``."""
    n = len(p.ch_mult)
    return dict(
        in_channels=p.in_channels,
        out_channels=p.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(p.ch * m for m in p.ch_mult),
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
        norm_num_groups=32,
        scaling_factor=p.scale_factor,
        shift_factor=p.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=p.resolution,
    )
