"""Save options: the dtype of LoRA files (bf16 halves them and reloads within bf16 rounding) and keeping only the
newest intermediate LoRA files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from flux_lora.config import SaveConfig
from flux_lora.lora.files import read_lora, write_lora
from flux_lora.lora.keys import linear_shapes
from flux_lora.model.flux import PRESETS

from helpers.lora import random_lora
from helpers.training import fit, tiny_config

P = PRESETS["tiny"]


def _dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")}


def test_bf16_halves_the_file_and_reloads_within_bf16_rounding(tmp_path):
    lora = random_lora(P, [n for n in linear_shapes(P) if n.startswith(("double_", "single_"))], rank=4)
    sizes, back = {}, {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        path = write_lora(tmp_path / f"{dtype}.safetensors", lora, P, dtype=dtype)
        assert _dtypes(path) == {dtype}
        sizes[dtype], back[dtype] = path.stat().st_size, read_lora(path, P)
    for half in (torch.bfloat16, torch.float16):
        assert 0.49 < sizes[half] / sizes[torch.float32] < 0.55  # the header and the fp32 alphas stay
    for name, w in lora.items():
        for part in ("down", "up"):
            exact, rounded = getattr(w, part), getattr(back[torch.bfloat16][name], part).float()
            torch.testing.assert_close(getattr(back[torch.float32][name], part), exact, rtol=0, atol=0)
            torch.testing.assert_close(rounded, exact, rtol=2**-8, atol=0)  # bf16: 8 significant bits
        assert back[torch.bfloat16][name].alpha == w.alpha
    assert any(not torch.equal(back[torch.bfloat16][n].up.float(), w.up) for n, w in lora.items())


def test_bad_save_options_fail_at_config_time():
    with pytest.raises(ValueError, match="save.dtype must be one of bf16, fp16, fp32, got 'bfloat'"):
        SaveConfig(dtype="bfloat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="save.keep_last must be >= 0"):
        SaveConfig(keep_last=-1)


def test_training_keeps_the_last_n_intermediate_loras_in_the_save_dtype(tmp_path, tiny_dev_dir):
    args = ["--max_steps=5", "--train.save_every_n_steps=1", "--save.keep_last=2", "--save.dtype=fp16"]
    cfg = tiny_config(tmp_path, tiny_dev_dir, *args)
    fit(cfg)
    kept = sorted(p.name for p in (cfg.output_path / "lora").iterdir())
    assert kept == ["tiny-step000003.safetensors", "tiny-step000004.safetensors"]
    assert _dtypes(cfg.output_path / "tiny.safetensors") == {torch.float16}
    assert _dtypes(cfg.output_path / "lora" / kept[-1]) == {torch.float16}
