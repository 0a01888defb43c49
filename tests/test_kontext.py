"""FLUX.1 Kontext: the variant recognised from its files, and inference with a reference image against diffusers'
FluxKontextPipeline on the tiny Kontext model (float32, bf16, fp8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux_lora.inference.kontext import fit_area, preferred_size, reference_ids, reference_size
from flux_lora.inference.pipeline import FluxPipeline
from flux_lora.model.flux import PRESETS, FluxParams
from flux_lora.model.fp8 import FP8Linear
from flux_lora.sampling import pack
from flux_lora.weights.keymaps import flux_to_diffusers, flux_to_diffusers_config
from flux_lora.weights.loading import flux_params, load_flow_model
from flux_lora.weights.tiny import write_tiny_model

from helpers.parity import diffusers_parts

H, W = 64, 96  # output: latent 8x12, 24 tokens
REF_W, REF_H = 48, 80  # the reference at its own size: latent 10x6, 15 tokens


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "kontext", variant="kontext", seed=2)


@pytest.fixture(scope="module")
def kontext_pipe(kontext_dir) -> FluxPipeline:
    return FluxPipeline.from_pretrained(kontext_dir, dtype=torch.float32, device="cpu")


def _reference() -> Image.Image:
    g = torch.Generator().manual_seed(5)
    arr = (torch.rand(REF_H, REF_W, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------ the variant


def test_kontext_is_recognised_from_its_files(kontext_dir, tiny_dev_dir, tmp_path):
    assert (kontext_dir / "flux1-kontext-dev.safetensors").is_file()
    assert flux_params(kontext_dir).kontext  # our metadata
    assert not flux_params(tiny_dev_dir).kontext
    assert flux_params("flux-kontext-dev") == FluxParams(kontext=True)
    assert PRESETS["flux-kontext-dev"].default_guidance == 2.5 and PRESETS["flux-dev"].default_guidance == 3.5
    # the official single file: dev's tensors, told apart by its name only (no params metadata)
    dit = load_flow_model(tiny_dev_dir, dtype=torch.float32)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in dit.state_dict().items()}
    official = tmp_path / "official"
    official.mkdir()
    save_file(state, official / "flux1-kontext-dev.safetensors")
    save_file(state, tmp_path / "flux1-dev.safetensors")
    with pytest.raises(Exception, match="head size"):  # header-only files of a tiny model need params...
        flux_params(official)
    loaded = load_flow_model(official, "tiny-kontext", dtype=torch.float32)
    assert loaded.params.kontext
    from flux_lora.weights.loading import is_kontext_source

    assert is_kontext_source(official / "flux1-kontext-dev.safetensors")
    assert not is_kontext_source(tmp_path / "flux1-dev.safetensors")
    # the diffusers layout: model_index.json above transformer/ names the Kontext pipeline
    root = tmp_path / "diffusers"
    (root / "transformer").mkdir(parents=True)
    p = dit.params
    save_file(flux_to_diffusers(state, p), root / "transformer" / "diffusion_pytorch_model.safetensors")
    (root / "transformer" / "config.json").write_text(json.dumps(flux_to_diffusers_config(p)))
    assert not flux_params(root / "transformer").kontext
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    assert flux_params(root / "transformer").kontext
    assert flux_params(root).kontext


def test_hub_id_downloads_resolve_to_kontext(kontext_dir, monkeypatch):
    """``black-forest-labs/FLUX.1-Kontext-dev`` holds flux1-kontext-dev.safetensors, which the snapshot brings."""
    from flux_lora.weights import hub

    def fake_download(repo_id: str, **kwargs: object) -> str:
        assert repo_id == "black-forest-labs/FLUX.1-Kontext-dev"
        return str(kontext_dir)

    folder = hub.resolve_model("hf:black-forest-labs/FLUX.1-Kontext-dev", ("dit",), download=fake_download)
    assert flux_params(folder).kontext


def test_tiny_cli_writes_kontext(tmp_path):
    from flux_lora.weights.tiny import main

    main([str(tmp_path / "k"), "--variant", "kontext", "--no-controlnets"])
    assert flux_params(tmp_path / "k").kontext


# ------------------------------------------------------------------------------------------ sizes and ids


def test_reference_sizes_and_ids():
    assert preferred_size(1000, 1000) == (1024, 1024)
    assert preferred_size(1920, 1080) == (1392, 752)
    assert reference_size(50, 83, "keep") == (48, 80)
    assert reference_size(500, 500, "preferred") == (1024, 1024)
    assert fit_area(48, 80, 64 * 96) == (48, 96)  # round(60.7) and round(101.2), down to multiples of 16
    assert fit_area(100, 100, 64 * 64) == (64, 64)
    ids = reference_ids(2, 10, 6)
    assert ids.shape == (2, 15, 3)
    assert (ids[..., 0] == 1).all()
    assert ids[0, -1].tolist() == [1.0, 4.0, 2.0]  # its own grid from 0: no offset by the output's size


# ------------------------------------------------------------------------------------------ parity


def _diffusers_kontext(pipe: FluxPipeline, dequantize: bool = False):
    diffusers = pytest.importorskip("diffusers")
    parts = diffusers_parts(pipe) if not dequantize else _dequantized_parts(pipe)
    if pipe.dtype != torch.float32:
        parts["transformer"].to(pipe.dtype)
        parts["vae"].to(pipe.dtype)
    return diffusers.FluxKontextPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, **parts
    )


def _dequantized_parts(pipe: FluxPipeline) -> dict:
    """diffusers' parts holding our fp8 DiT's weights dequantized to float32 (the values our fp8 layers use)."""
    diffusers = pytest.importorskip("diffusers")
    parts = diffusers_parts(_Float(pipe))
    p = pipe.dit.params
    state = {}
    for name, module in pipe.dit.named_modules():
        for key, t in module.named_parameters(recurse=False):
            state[f"{name}.{key}"] = t.detach().float()
        if isinstance(module, FP8Linear):
            state[f"{name}.weight"] = module.dequantized_weight(torch.float32)
    transformer = diffusers.FluxTransformer2DModel(**flux_to_diffusers_config(p))
    transformer.load_state_dict(flux_to_diffusers(state, p), strict=True)
    parts["transformer"] = transformer
    return parts


class _Float:
    """A stand-in pipeline whose DiT state dict diffusers_parts can read (it is replaced afterwards)."""

    def __init__(self, pipe: FluxPipeline):
        self.ae = pipe.ae
        from flux_lora.model.flux import Flux

        with torch.device("meta"):
            self.dit = Flux(pipe.dit.params)
        self.dit.to_empty(device="cpu")


def _run_both(pipe: FluxPipeline, theirs, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    emb = pipe.encode(["make it pink", "a red car"])
    noise = pack(pipe.noise(2, H // 8, W // 8, torch.Generator().manual_seed(0)))
    ref = _reference()
    ours = pipe(
        text_embeddings=emb,
        latents=noise,
        image=ref,
        reference_size="keep",
        height=H,
        width=W,
        num_inference_steps=steps,
        output_type="latent",
        progress=False,
    )
    out = theirs(
        prompt_embeds=emb.txt,
        pooled_prompt_embeds=emb.y,
        image=ref,
        _auto_resize=False,
        max_area=H * W,
        height=H,
        width=W,
        latents=noise.to(pipe.dtype),
        guidance_scale=2.5,
        num_inference_steps=steps,
        max_sequence_length=pipe.dit.params.max_sequence_length,
        output_type="latent",
    ).images
    return pack(ours).float(), out.float(), noise


def test_matches_diffusers_kontext_pipeline(kontext_pipe):
    theirs = _diffusers_kontext(kontext_pipe)
    ours, ref, noise = _run_both(kontext_pipe, theirs)
    assert (ours - noise).abs().max() > 1  # the sampler moved far from the noise
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the reference matters: without it the result differs
    plain = kontext_pipe(
        text_embeddings=kontext_pipe.encode(["make it pink", "a red car"]),
        latents=noise,
        height=H,
        width=W,
        num_inference_steps=3,
        output_type="latent",
        progress=False,
    )
    assert (pack(plain) - ours).abs().max() > 1e-2


def test_matches_diffusers_kontext_pipeline_in_bf16(kontext_dir):
    pipe = FluxPipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, device="cpu")
    ours, ref, _ = _run_both(pipe, _diffusers_kontext(pipe))
    torch.testing.assert_close(ours, ref, atol=BF16_ATOL, rtol=0)


BF16_ATOL = 0.05  # measured 0.030 (outputs of magnitude ~2.3): bf16 rounding in two orders of operations


def test_matches_diffusers_kontext_pipeline_in_fp8(kontext_dir):
    pipe = FluxPipeline.from_pretrained(kontext_dir, quantize="float8_e4m3fn", dtype=torch.float32, device="cpu")
    assert isinstance(pipe.dit.double_blocks[0].img_attn.qkv, FP8Linear)
    ours, ref, _ = _run_both(pipe, _diffusers_kontext(pipe, dequantize=True))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_reference_is_checked(kontext_pipe, tmp_path):
    with pytest.raises(ValueError, match="reference_size"):
        kontext_pipe("x", image=_reference(), reference_size="big", height=32, width=32, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch of 3 for 1 prompts"):
        kontext_pipe("x", image=torch.rand(3, 3, 32, 32), height=32, width=32, progress=False)
    shutil.rmtree(tmp_path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ carried over


def test_block_offload_and_loras_carry_over(kontext_dir):
    """Block offload (on the fake accelerator) gives the same bits; an unfused LoRA changes the edit and equals
    the same LoRA fused into float32 weights."""
    from flux_lora.lora.runtime import apply_loras, remove_loras

    from helpers.lora import random_lora
    from helpers.offload import FakeAccelerator, realign

    pipe = FluxPipeline.from_pretrained(kontext_dir, dtype=torch.float32, device="cpu")
    for module in (pipe.dit, pipe.ae, pipe.text_encoders):
        realign(module)
    kw = dict(image=_reference(), reference_size="keep", height=H, width=W, num_inference_steps=2, seed=1)
    run = dict(output_type="latent", progress=False, **kw)
    plain = pipe("make it pink", **run)
    pipe.enable_offload("block", transfer=FakeAccelerator())
    try:
        assert torch.equal(pipe("make it pink", **run), plain)
    finally:
        pipe.enable_offload(None)
    lora = random_lora(pipe.dit, ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"], seed=3)
    apply_loras(pipe.dit, [(lora, 1.0, "edit")])
    try:
        unfused = pipe("make it pink", **run)
    finally:
        remove_loras(pipe.dit)
    apply_loras(pipe.dit, [(lora, 1.0, "edit")], mode="fused")
    fused = pipe("make it pink", **run)
    assert (unfused - plain).abs().max() > 1e-3
    torch.testing.assert_close(unfused, fused, atol=1e-4, rtol=1e-4)


def test_generate_cli_with_a_reference_image(kontext_dir, kontext_pipe, tmp_path):
    from flux_lora.cli.generate import main, parse_args

    from helpers.cli import GENERATE_ARGS

    ref = tmp_path / "ref.png"
    _reference().save(ref)
    args = ["--model", str(kontext_dir), *GENERATE_ARGS, "--seed", "4", "--reference-size", "keep"]
    (out,) = main([*args, "--reference-image", str(ref), "--output", str(tmp_path / "o.png")])
    meta = json.loads(Image.open(out).text["flux_lora"])
    assert (meta["guidance"], meta["reference_image"], meta["reference_size"]) == (2.5, str(ref), "keep")
    expected = kontext_pipe(
        "a photo of a dog",
        image=_reference(),
        reference_size="keep",
        height=32,
        width=48,
        num_inference_steps=2,
        seed=4,
        progress=False,
    )[0]
    assert Image.open(out).convert("RGB").tobytes() == expected.tobytes()
    (plain,) = main([*args, "--output", str(tmp_path / "p.png")])
    assert Image.open(plain).tobytes() != Image.open(out).tobytes()
    with pytest.raises(SystemExit):
        parse_args([*args, "--reference-image", str(tmp_path / "missing.png")])
