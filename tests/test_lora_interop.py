"""Our LoRA files through diffusers' own LoRA loader, and diffusers/peft LoRA files through ours.

Oracle: diffusers' ``FluxTransformer2DModel`` holding the same weights as our ``Flux``. A LoRA merged into our
model (``W += delta`` in float32) must give the output diffusers gives after its loader read the file.
"""

from __future__ import annotations

import pytest
import torch

from flux_lora.lora.files import read_lora, write_lora
from flux_lora.lora.keys import detect_layout, linear_shapes
from flux_lora.lora.runtime import apply_loras
from flux_lora.lora.weight import LoraWeight, fuse_row_blocks
from flux_lora.model.flux import PRESETS, Flux, FluxParams
from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config
from flux_lora.weights.safetensors_io import read_keys, read_metadata

from helpers.dit import dit_inputs
from helpers.lora import random_lora
from helpers.numerics import assert_same_output
from helpers.parity import adapter_state, diffusers_forward, load_with_diffusers, transformer_pipeline

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

TINY = PRESETS["tiny"]
# diffusers' kohya converter hard-codes linear1's split sizes for hidden 3072: real width, one block each.
REAL_WIDTH = FluxParams(vec_in_dim=32, context_in_dim=32, depth=1, depth_single_blocks=1)


def _inputs(p: FluxParams, batch=2, lat_h=4, lat_w=6, txt_len=5, seed=0) -> dict:
    return dit_inputs(p, batch, lat_h, lat_w, txt_len, seed)


def _models(p: FluxParams, share: bool = False):
    """Our Flux with random weights and a diffusers model holding the same (shared or copied) weights."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        ours = Flux(p)
        theirs = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(p))
    sd = {}
    for key, t in ours.state_dict().items():
        lo, hi = (-0.02, 0.02) if t.ndim == 2 else ((0.5, 1.5) if "norm" in key else (-0.05, 0.05))
        sd[key] = torch.empty(t.shape).uniform_(lo, hi, generator=g)
    ours.load_state_dict(sd, assign=True)
    converted = flux_to_diffusers(ours.state_dict(), p)
    theirs.load_state_dict(converted if share else {k: v.clone() for k, v in converted.items()}, assign=True)
    return ours.eval(), theirs.eval()


def _merge(model: Flux, lora: dict[str, LoraWeight]) -> None:
    with torch.no_grad():
        for name, w in lora.items():
            model.get_submodule(name).weight += w.delta()


@pytest.mark.parametrize("bake", [True, False])
def test_our_diffusers_file_in_diffusers_loader(tmp_path, caplog, bake):
    """(a) Every layer kind diffusers supports (embedders, blocks, final layer and its swap), per-module ranks
    and alphas, scale baked or as .alpha keys: diffusers loads every key and matches our merged
    model."""
    ours, theirs = _models(TINY)
    x = _inputs(TINY)
    base = ours(**x).detach()
    names = sorted(linear_shapes(TINY))
    ranks, alphas = [2 + i % 3 for i in range(len(names))], [float(1 + i % 5) for i in range(len(names))]
    lora = random_lora(TINY, names, rank=ranks, alpha=alphas, scale=0.05, seed=1)  # alphas mostly != rank
    path = write_lora(tmp_path / "pytorch_lora_weights.safetensors", lora, TINY, layout="diffusers", bake_scale=bake)
    assert detect_layout(read_keys(path)) == "diffusers"
    warnings = load_with_diffusers(transformer_pipeline(theirs), path, caplog)
    assert warnings == []
    loaded = set(adapter_state(theirs))
    in_file = {k.removeprefix("transformer.") for k in read_keys(path) if not k.endswith(".alpha")}
    assert loaded == in_file  # zero keys left unloaded, none missing
    assert sum(isinstance(m, LoraLayer) for m in theirs.modules()) == len(in_file) // 2
    _merge(ours, lora)
    assert_same_output(ours(**x).detach(), diffusers_forward(theirs, x), base)


def test_our_kohya_file_in_diffusers_loader_at_real_width(tmp_path, caplog):
    """(a') kohya layout through diffusers' kohya converter (hidden 3072): block layers, one of them a
    rank-concatenated (block-diagonal) qkv whose alpha must be scaled by the number of parts."""
    ours, theirs = _models(REAL_WIDTH, share=True)  # shared weights: merge into ours only after diffusers ran
    x = _inputs(REAL_WIDTH, batch=1, lat_h=2, lat_w=4, txt_len=3)
    with torch.no_grad():
        base = ours(**x)
    blocks = sorted(n for n in linear_shapes(REAL_WIDTH) if n.startswith(("double_blocks.", "single_blocks.")))
    lora = random_lora(REAL_WIDTH, blocks, rank=4, alpha=8.0, scale=0.05, seed=2)
    parts = random_lora({f"txt_attn.{m}": (3072, 3072) for m in "qkv"}, rank=2, alpha=3.0, scale=0.05, seed=3)
    split = [(k * 3072, w) for k, w in enumerate(parts.values())]
    lora["double_blocks.0.txt_attn.qkv"] = fuse_row_blocks(split, 9216)
    assert (lora["double_blocks.0.txt_attn.qkv"].rank, lora["double_blocks.0.txt_attn.qkv"].alpha) == (6, 9.0)
    path = write_lora(tmp_path / "kohya.safetensors", lora, REAL_WIDTH)
    assert load_with_diffusers(transformer_pipeline(theirs), path, caplog) == []
    assert len(adapter_state(theirs)) == 2 * (len(blocks) + 2 + 2 + 3)  # split: qkv (2 more each), linear1 (3)
    want = diffusers_forward(theirs, x)
    _merge(ours, lora)
    with torch.no_grad():
        assert_same_output(ours(**x), want, base)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_lora_made_on_diffusers_model_reads_into_ours(tmp_path, use_rslora):
    """(b) peft injects a LoRA into diffusers' model (different A per q/k/v, per-module ranks and alphas),
    diffusers saves it; our reader folds it into fused BFL modules and our merged model reproduces diffusers'
    output."""
    from peft import LoraConfig

    ours, theirs = _models(TINY)
    x = _inputs(TINY)
    base = ours(**x).detach()
    targets = [n for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear)]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        rank_pattern={"to_k": 2, "proj_out": 3},
        alpha_pattern={"proj_mlp": 3.0, "norm_out.linear": 5.0},
        use_rslora=use_rslora,
    )
    theirs.add_adapter(config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    want = diffusers_forward(theirs, x)
    diffusers.FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(theirs),
        transformer_lora_adapter_metadata=theirs.peft_config["default"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert "lora_adapter_metadata" in read_metadata(path)
    lora = read_lora(path, TINY)
    assert set(lora) == set(linear_shapes(TINY))
    assert lora["single_blocks.0.linear1"].rank == 4 + 2 + 4 + 4  # q, k (rank 2), v, mlp: different A
    _merge(ours, lora)
    assert_same_output(ours(**x).detach(), want, base)


def _peft_file(tmp_path, theirs, **config) -> tuple:
    """peft injects a LoRA with ``config`` into diffusers' model (lora_B and any bias / magnitude random), diffusers
    saves it; returns (the file, diffusers' output with it)."""
    from peft import LoraConfig

    targets = [n for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear)]
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=10, target_modules=targets, **config))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    diffusers.FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(theirs),
        transformer_lora_adapter_metadata=theirs.peft_config["default"].to_dict(),
    )
    return tmp_path / "pytorch_lora_weights.safetensors", diffusers_forward(theirs, _inputs(TINY))


@pytest.mark.parametrize("kind", ["lora_bias", "dora"])
def test_peft_bias_and_dora_files_give_pefts_output(tmp_path, kind):
    """A peft LoRA with ``lora_bias=True`` (peft adds ``bias * alpha / r``) or ``use_dora=True`` (peft's
    ``lora_magnitude_vector``), alpha 10 != rank 4, on every Linear of diffusers' model, saved by diffusers: our
    reader and run-time LoRA reproduce peft's own forward."""
    ours, theirs = _models(TINY)
    x = _inputs(TINY)
    base = ours(**x).detach()
    path, want = _peft_file(tmp_path, theirs, **{"lora_bias" if kind == "lora_bias" else "use_dora": True})
    marker = ".lora_B.bias" if kind == "lora_bias" else ".lora_magnitude_vector"
    assert any(k.endswith(marker) for k in read_keys(path))
    apply_loras(ours, [(read_lora(path, TINY), 1.0, "peft")])
    with torch.no_grad():
        assert_same_output(ours(**x), want, base)
