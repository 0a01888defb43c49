"""Loading the DiT, autoencoder and text encoders from every supported layout, and the errors for bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_lora.model.flux import PRESETS
from flux_lora.model.fp8 import FP8, FP8Linear
from flux_lora.model.text_encoders import TextEncoders
from flux_lora.weights import hub
from flux_lora.weights.loading import load_autoencoder, load_flow_model
from flux_lora.weights.safetensors_io import CheckpointError
from flux_lora.weights.tiny import random_flux

from helpers.dit import dit_inputs
from helpers.numerics import rel_err


def _sd(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _velocity(model, p, seed=0):
    with torch.no_grad():
        return model(**dit_inputs(p, seed=seed))


def test_official_folder_loads_every_component(tiny_dev_dir):
    model = load_flow_model(tiny_dev_dir, dtype=torch.float32)
    assert model.params == PRESETS["tiny"]  # read from the file's metadata
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ae = load_autoencoder(tiny_dev_dir, dtype=torch.float32)
    te = TextEncoders.from_folder(tiny_dev_dir, model.params.max_sequence_length, dtype=torch.float32)
    emb = te.encode(["a photo of a dog", "red car on a street"])
    assert emb.txt.shape == (2, 32, model.params.context_in_dim) and emb.y.shape == (2, model.params.vec_in_dim)
    clip_ids, t5_ids = te.tokenize(["a dog"])
    assert clip_ids.shape == (1, 77) and t5_ids.shape == (1, 32)
    assert clip_ids[0, 0] == te.clip_tokenizer.bos_token_id and t5_ids[0, -1] == te.t5_tokenizer.pad_token_id
    # different prompts give different embeddings, the same prompt the same ones
    assert not torch.allclose(emb.y[0], emb.y[1])
    torch.testing.assert_close(te.encode("a photo of a dog").txt[0], emb.txt[0])
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    assert ae.encode(x).shape == (1, 16, 4, 6)


def test_schnell_folder(tiny_schnell_dir):
    model = load_flow_model(tiny_schnell_dir, dtype=torch.float32)
    assert not model.params.guidance_embed and model.params.shift_schedule is False
    assert _velocity(model, model.params).shape == (2, 12, 64)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_single_file_with_prefix(tiny_dev_dir, tmp_path, prefix):
    sd = _sd(tiny_dev_dir / "flux1-dev.safetensors")
    extra = {"text_encoders.clip_l.whatever.weight": torch.zeros(2)}  # an all-in-one file's other parts
    path = tmp_path / "merged.safetensors"
    save_file(
        {**{prefix + k: v for k, v in sd.items()}, **extra},
        str(path),
        metadata=json.loads(json.dumps({"flux_lora.params": json.dumps(PRESETS["tiny"].to_dict())})),
    )
    a = load_flow_model(path, dtype=torch.float32)
    b = load_flow_model(tiny_dev_dir, dtype=torch.float32)
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb)


def test_plain_fp8_file_loads_as_is(tiny_dev_dir, tmp_path):
    """ComfyUI-style fp8 checkpoints: every Linear weight cast to float8_e4m3fn, no scales."""
    sd = _sd(tiny_dev_dir / "flux1-dev.safetensors")
    fp8 = {k: (v.to(FP8) if v.ndim == 2 else v) for k, v in sd.items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(fp8, str(path), metadata={"flux_lora.params": json.dumps(PRESETS["tiny"].to_dict())})
    model = load_flow_model(path, dtype=torch.float32)  # no quantize asked: fp8 layers stay fp8
    qkv = model.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, FP8Linear) and isinstance(model.img_in, FP8Linear)
    assert torch.equal(qkv.weight.view(torch.uint8), fp8["double_blocks.0.img_attn.qkv.weight"].view(torch.uint8))
    assert torch.equal(qkv.weight_scale, torch.ones_like(qkv.weight_scale))
    ref = load_flow_model(tiny_dev_dir, dtype=torch.float32)
    out, expected = _velocity(model, model.params), _velocity(ref, ref.params)
    assert rel_err(out, expected) < 0.1  # fp8 rounding only


def test_scaled_fp8_files_load(tiny_dev_dir, tmp_path):
    """Our own quantized state dict (per-channel weight_scale) and ComfyUI's scaled fp8 (scale_weight)."""
    model = load_flow_model(tiny_dev_dir, dtype=torch.float32, quantize="float8_e4m3fn")
    path = tmp_path / "ours-fp8.safetensors"
    save_file(model.state_dict(), str(path), metadata={"flux_lora.params": json.dumps(PRESETS["tiny"].to_dict())})
    again = load_flow_model(path, dtype=torch.float32)
    torch.testing.assert_close(_velocity(again, again.params), _velocity(model, model.params), rtol=0, atol=0)

    sd = _sd(tiny_dev_dir / "flux1-dev.safetensors")
    comfy = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
    for k, v in sd.items():
        if v.ndim == 2:
            scale = v.abs().max() / 448
            comfy[k] = (v / scale).to(FP8)
            comfy[k.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
        else:
            comfy[k] = v
    path = tmp_path / "comfy-scaled.safetensors"
    save_file(comfy, str(path), metadata={"flux_lora.params": json.dumps(PRESETS["tiny"].to_dict())})
    scaled = load_flow_model(path, dtype=torch.float32)
    w = scaled.single_blocks[0].linear1.dequantized_weight()
    torch.testing.assert_close(w, sd["single_blocks.0.linear1.weight"], rtol=0.07, atol=1e-3)


def test_quantize_on_load(tiny_dev_dir):
    model = load_flow_model(tiny_dev_dir, dtype=torch.float32, quantize="float8_e4m3fn")
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == 2 * 10 + 2 * 3  # every Linear of the 2 double and 2 single blocks
    assert all(n.startswith(("double_blocks", "single_blocks")) for n in fp8)
    assert model.img_in.weight.dtype == torch.float32
    all_fp8 = load_flow_model(tiny_dev_dir, dtype=torch.float32, quantize="float8_e4m3fn", quant_policy="all")
    assert sum(isinstance(m, FP8Linear) for m in all_fp8.modules()) == 36


# ---------------------------------------------------------------------------------------------- bad input


def test_not_safetensors(tmp_path):
    bad = tmp_path / "flux1-dev.safetensors"
    bad.write_bytes(b"\x80\x04this is a pickle, not safetensors")
    with pytest.raises(CheckpointError, match=r"flux1-dev\.safetensors is not a readable safetensors file"):
        load_flow_model(bad)


def _write_variant(tiny_dev_dir, tmp_path, edit):
    sd = _sd(tiny_dev_dir / "flux1-dev.safetensors")
    edit(sd)
    path = tmp_path / "edited.safetensors"
    save_file(sd, str(path), metadata={"flux_lora.params": json.dumps(PRESETS["tiny"].to_dict())})
    return path


def test_missing_unexpected_and_misshapen_keys(tiny_dev_dir, tmp_path):
    path = _write_variant(tiny_dev_dir, tmp_path, lambda sd: sd.pop("single_blocks.1.linear2.bias"))
    missing = r"edited\.safetensors: missing keys \['single_blocks\.1\.linear2\.bias'\]"
    with pytest.raises(CheckpointError, match=missing):
        load_flow_model(path)
    path = _write_variant(tiny_dev_dir, tmp_path, lambda sd: sd.update({"double_blocks.0.extra.weight": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['double_blocks\.0\.extra\.weight'\]"):
        load_flow_model(path)
    path = _write_variant(tiny_dev_dir, tmp_path, lambda sd: sd.update({"txt_in.weight": torch.ones(64, 31)}))
    with pytest.raises(CheckpointError, match=r"'txt_in\.weight' has shape \(64, 31\), the model expects \(64, 32\)"):
        load_flow_model(path)


def test_schnell_file_asked_to_run_as_dev(tiny_schnell_dir):
    with pytest.raises(CheckpointError, match="schnell-type .* cannot run with dev-type"):
        load_flow_model(tiny_schnell_dir, "tiny")
    with pytest.raises(CheckpointError, match="schnell-type"):
        load_flow_model(tiny_schnell_dir / "flux1-schnell.safetensors", "flux-dev")


def test_real_size_schnell_file_inferred_without_metadata(tmp_path):
    """Shape inference: a schnell-shaped file without our metadata is recognised (and refused as dev)."""
    p = PRESETS["tiny-schnell"]
    sd = random_flux(p, 0).state_dict()
    path = tmp_path / "flux1-schnell.safetensors"
    save_file(sd, str(path))  # head size 32, no metadata: the loader cannot guess the RoPE axes
    with pytest.raises(CheckpointError, match="head size 32 is not FLUX's 128"):
        load_flow_model(path)
    assert load_flow_model(path, p, dtype=torch.float32).params == p


def test_folder_without_model(tmp_path):
    with pytest.raises(CheckpointError, match="holds no FLUX DiT"):
        load_flow_model(tmp_path)
    with pytest.raises(CheckpointError, match="holds no autoencoder"):
        load_autoencoder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"lacks the text-encoder folders \['text_encoder'"):
        TextEncoders.from_folder(tmp_path, 32)


def test_diffusers_file_given_as_single_file(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="diffusers-layout file: pass its transformer/ folder"):
        load_flow_model(path)


# ---------------------------------------------------------------------------------------------- ModelScope


def test_modelscope_download_fetches_only_needed_files(tiny_dev_dir):
    calls = []

    def fake_download(model_id, **kwargs):
        calls.append((model_id, kwargs))
        return str(tiny_dev_dir)

    folder = hub.resolve_model("AI-ModelScope/FLUX.1-dev", ["dit", "ae"], download=fake_download)
    assert folder == tiny_dev_dir
    assert calls[0][0] == "AI-ModelScope/FLUX.1-dev"
    assert calls[0][1]["allow_patterns"] == ["flux1-*.safetensors", "ae.safetensors"]
    hub.resolve_model("AI-ModelScope/FLUX.1-schnell", ["text_encoders"], download=fake_download)
    assert "transformer/*" not in calls[1][1]["allow_patterns"]
    assert "text_encoder_2/*" in calls[1][1]["allow_patterns"]
    assert hub.resolve_model(tiny_dev_dir, download=fake_download) == tiny_dev_dir and len(calls) == 2


def test_modelscope_offline_error_says_what_to_do():
    def offline(model_id, **kwargs):
        raise ConnectionError("Max retries exceeded with url: modelscope.cn")

    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model("AI-ModelScope/FLUX.1-dev", download=offline)
    msg = str(e.value)
    assert (
        "AI-ModelScope/FLUX.1-dev" in msg
        and "offline and not in the download cache" in msg
        and "Max retries" not in msg  # the inner error says no more than that
        and "pass a local folder with --model.source" in msg
    )


def test_modelscope_incomplete_download(tmp_path):
    with pytest.raises(hub.ModelNotFoundError, match=r"lacks \['flux1-\*\.safetensors'\]"):
        hub.resolve_model("AI-ModelScope/FLUX.1-dev", ["dit"], download=lambda *a, **k: str(tmp_path))


def test_unknown_source():
    with pytest.raises(hub.ModelNotFoundError, match=r"^\./does/not/exist: no such folder or file"):
        hub.resolve_model("./does/not/exist")
