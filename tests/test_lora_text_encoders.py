"""Text-encoder parts of LoRA files (kohya lora_te1_/lora_te3_, diffusers text_encoder(_2).) on CLIP-L and T5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flux_lora.lora.encoders import read_text_encoder_lora
from flux_lora.lora.files import LoraFormatError, read_lora
from flux_lora.lora.runtime import apply_loras, remove_loras
from flux_lora.model.flux import PRESETS
from flux_lora.model.text_encoders import TextEncoders

P = PRESETS["tiny"]
CLIP_Q = "clip.encoder.layers.0.self_attn.q_proj"
T5_Q = "t5.encoder.block.0.layer.0.SelfAttention.q"


@pytest.fixture(scope="module")
def encoders(tiny_dev_dir) -> TextEncoders:
    return TextEncoders.from_folder(tiny_dev_dir, P.max_sequence_length, dtype=torch.float32)


def _pair(layer, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, layer.in_features, generator=g) * 0.3, torch.randn(
        layer.out_features, rank, generator=g
    ) * 0.3


def _file(encoders, layout: str) -> tuple[dict, dict]:
    clip, t5 = encoders.get_submodule(CLIP_Q), encoders.get_submodule(T5_Q)
    (cd, cu), (td, tu) = _pair(clip, 2, 0), _pair(t5, 3, 1)
    if layout == "kohya":
        c, t = (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        )
        sd = {f"{c}.lora_down.weight": cd, f"{c}.lora_up.weight": cu, f"{c}.alpha": torch.tensor(4.0)}
        sd |= {f"{t}.lora_down.weight": td, f"{t}.lora_up.weight": tu, f"{t}.alpha": torch.tensor(3.0)}
        scales = {CLIP_Q: 2.0, T5_Q: 1.0}
    else:
        c, t = (
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
        )
        sd = {f"{c}.lora_A.weight": cd, f"{c}.lora_B.weight": cu, f"{t}.lora_A.weight": td, f"{t}.lora_B.weight": tu}
        scales = {CLIP_Q: 1.0, T5_Q: 1.0}
    dit = "lora_unet_double_blocks_0_img_attn_proj"
    g = torch.Generator().manual_seed(2)
    sd[f"{dit}.lora_down.weight"] = torch.randn(2, P.hidden_size, generator=g)
    sd[f"{dit}.lora_up.weight"] = torch.randn(P.hidden_size, 2, generator=g)
    return sd, {CLIP_Q: scales[CLIP_Q] * cu @ cd, T5_Q: scales[T5_Q] * tu @ td}


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("mode", ["unfused", "fused"])
def test_text_encoder_parts_apply_to_clip_and_t5(encoders, tmp_path, layout, mode):
    sd, deltas = _file(encoders, layout)
    path = tmp_path / "te.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraFormatError, match="text-encoder"):
        read_lora(path, P)  # the DiT reader alone cannot apply them
    assert set(read_lora(path, P, skip_text_encoders=True)) == {"double_blocks.0.img_attn.proj"}
    te = read_text_encoder_lora(path, encoders)
    assert set(te) == {CLIP_Q, T5_Q}
    before = {k: v.clone() for k, v in encoders.state_dict().items()}
    x = {name: torch.randn(2, encoders.get_submodule(name).in_features) for name in deltas}
    plain = {name: encoders.get_submodule(name)(x[name]) for name in deltas}
    emb = encoders.encode("a dog")
    apply_loras(encoders, [(te, 0.5, "te")], mode=mode)
    for name, d in deltas.items():
        effect = encoders.get_submodule(name)(x[name]) - plain[name]
        torch.testing.assert_close(effect, F.linear(x[name], 0.5 * d), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(encoders.encode("a dog").txt, emb.txt)
    remove_loras(encoders)
    after = encoders.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(encoders.encode("a dog").txt, emb.txt, rtol=0, atol=0)


def test_unknown_text_encoder_modules_are_listed(encoders):
    sd = {"lora_te1_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": torch.ones(2, 4)}
    with pytest.raises(LoraFormatError, match="layers_9_mlp_fc1"):
        read_text_encoder_lora(sd, encoders)
    assert read_text_encoder_lora(sd, encoders, allow_partial=True) == {}


def test_text_encoder_lora_bias_is_scaled_as_peft_adds_it(encoders):
    """peft's ``lora_B.bias`` counts ``alpha / r`` times, as its weight (alpha 4, rank 2: twice)."""
    clip = encoders.get_submodule(CLIP_Q)
    down, up = _pair(clip, 2, 0)
    b = torch.randn(clip.out_features, generator=torch.Generator().manual_seed(3))
    c = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    sd = {f"{c}.lora_A.weight": down, f"{c}.lora_B.weight": up, f"{c}.lora_B.bias": b, f"{c}.alpha": torch.tensor(4.0)}
    (patch,) = read_text_encoder_lora(sd, encoders)[CLIP_Q]
    torch.testing.assert_close(patch.bias, 2.0 * b)
    torch.testing.assert_close(patch.delta(clip.weight), 2.0 * up @ down)
