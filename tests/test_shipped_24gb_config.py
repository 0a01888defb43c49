"""The shipped ai-toolkit-style config sets what it says it does (it also loads in test_config.py)."""

from pathlib import Path

from flux_lora.config import load_config

ROOT = Path(__file__).parents[1]


def test_24gb_config_is_what_it_says():
    cfg = load_config(ROOT / "configs/flux-dev_lora-r16_fp8_24gb.yaml")
    assert cfg.model.quantize == "float8_e4m3fn" and cfg.lora.rank == 16 and cfg.data.resolutions == [512, 768, 1024]
    assert (
        cfg.save.dtype == "bf16" and cfg.save.keep_last == 4 and cfg.ema.enabled and cfg.train.logger == "tensorboard"
    )
