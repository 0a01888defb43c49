"""Memory-aware presets (flux_lora/presets.py): the closed form reproduces the memory model's published rows, every
preset that fits stays under the card less its margin, bigger cards never get worse settings, and the overrides
are config keys the loader takes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.memory_model import TRAIN_CASES, closed_form_gb
from flux_lora.config import load_config
from flux_lora.presets import CARD_SIZES_GB, estimate_peak_gb, margin_gb, preset_for

ROOT = Path(__file__).parents[1]
RESOLUTIONS = (512, 768, 1024)


def _published_rows() -> dict[tuple[int, str, str], float]:
    """(res, base, checkpointing) -> peak GB from the memory model's table in benchmarks/RESULTS.md."""
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    rows = {}
    for m in re.finditer(
        r"^\| \**(512|1024)\** \| \**(fp8|bf16)\** \| \**(full|selective|none)\** \| [\d.]+ \| \**([\d.]+)", text, re.M
    ):
        rows[(int(m[1]), m[2], m[3])] = float(m[4])
    return rows


def test_closed_form_matches_the_memory_model_rows():
    rows = _published_rows()
    assert len(rows) == 8
    for (res, base, ckpt), peak in rows.items():
        assert estimate_peak_gb("flux-dev", res, base=base, checkpointing=ckpt) == pytest.approx(peak, abs=0.005)
    fp8_gemms = next(c for c in TRAIN_CASES if c.fp8_matmul)  # the benchmark's own cases, through its import
    assert closed_form_gb(fp8_gemms) == pytest.approx(15.78, abs=0.005)
    # more tokens, batch, rank or fewer swapped blocks never need less
    assert estimate_peak_gb("flux-dev", 1024, batch=2) > estimate_peak_gb("flux-dev", 1024)
    assert estimate_peak_gb("flux-dev", 1024, rank=32) > estimate_peak_gb("flux-dev", 1024)
    assert estimate_peak_gb("flux-dev", 1024, blocks_to_swap=10) < estimate_peak_gb("flux-dev", 1024, blocks_to_swap=5)
    with pytest.raises(ValueError, match="unknown variant 'flux-pro'"):
        estimate_peak_gb("flux-pro", 1024)


@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell"])
def test_presets_fit_and_bigger_cards_never_get_worse(variant):
    for res in RESOLUTIONS:
        previous = None
        for card in CARD_SIZES_GB:
            p = preset_for(card, res, variant)
            o = p.overrides
            assert (p.card_gb, p.resolution, p.variant) == (card, res, variant) and p.notes
            assert p.peak_gb == pytest.approx(
                estimate_peak_gb(
                    variant,
                    res,
                    base="fp8" if o["model.quantize"] else "bf16",
                    checkpointing="none"
                    if not o["model.gradient_checkpointing"]
                    else "selective"
                    if o["model.selective_checkpointing"]
                    else "full",
                    rank=o["lora.rank"],
                    batch=o["data.batch_size"],
                    blocks_to_swap=o["model.blocks_to_swap"],
                    fp8_matmul=bool(o["model.quantize"]) and not o["model.blocks_to_swap"],
                )
            )
            if p.fits:
                assert p.peak_gb <= card - margin_gb(card)
            if o["model.blocks_to_swap"]:
                assert o["model.gradient_checkpointing"] and not o["model.selective_checkpointing"]
            if previous is not None:
                q = previous.overrides
                assert p.fits >= previous.fits
                assert o["model.blocks_to_swap"] <= q["model.blocks_to_swap"], (card, res)
                assert o["data.batch_size"] >= q["data.batch_size"], (card, res)
                assert o["lora.rank"] >= q["lora.rank"], (card, res)
            previous = p
    # the large cards train unquantized; the 24 GB card at 1024 px on fp8 without block swap
    assert preset_for(80, 1024, variant).overrides["model.quantize"] is None
    assert preset_for(24, 1024, variant).overrides["model.quantize"] == "float8_e4m3fn"
    assert preset_for(24, 1024, variant).overrides["model.blocks_to_swap"] == 0


def test_nothing_fits_is_said():
    p = preset_for(6, 1024)
    assert not p.fits and p.peak_gb > 6 - margin_gb(6) and p.notes.startswith("Nothing fits")
    with pytest.raises(ValueError, match="multiple of 16"):
        preset_for(24, 1000)


def test_overrides_are_config_keys_the_loader_takes():
    for card in CARD_SIZES_GB:
        for res in RESOLUTIONS:
            p = preset_for(card, res)
            cfg = load_config(ROOT / "configs/tiny.yaml", p.args())
            assert cfg.model.blocks_to_swap == p.overrides["model.blocks_to_swap"]
            assert cfg.model.quantize == p.overrides["model.quantize"]
            assert cfg.data.batch_size == p.overrides["data.batch_size"]
            assert cfg.lora.rank == p.overrides["lora.rank"] and cfg.data.resolution == res


def test_presets_import_no_torch():
    code = "import sys, flux_lora.presets; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
