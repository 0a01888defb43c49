"""Cache entries are checksummed: damaged ones are named in a warning and encoded again, never trained on."""

from __future__ import annotations

import logging

import pytest
import torch

from flux_lora.data.cache import CacheEntryError, fill_cache

from helpers.cache import Loaders, forbidden, setup_run, write_data


def _flip_bytes_near_the_end(path):
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 16, len(raw) - 8):  # inside the last tensor's data, not the header
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_entries_are_reencoded_and_named(tmp_path, tiny_dev_dir, caplog):
    data_dir = write_data(tmp_path / "data")
    cache = tmp_path / "cache"
    _, data, plan = setup_run(data_dir, tiny_dev_dir, cache)
    fill_cache(plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False)
    store = plan.store
    flipped = store.latent_path(plan.variants[0][0].key)
    truncated = store.text_path(plan.text_keys[plan.captions[1]])
    emptied = store.latent_path(plan.variants[2][0].key)
    good_latent = store.read_latent(plan.variants[0][0].key)
    _flip_bytes_near_the_end(flipped)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    emptied.write_bytes(b"")
    with pytest.raises(CacheEntryError, match=str(flipped)):
        store.read_latent(plan.variants[0][0].key)

    with caplog.at_level(logging.WARNING, logger="flux_lora.data.cache"):
        _, data, plan = setup_run(data_dir, tiny_dev_dir, cache)
        plan = plan.refresh()  # planned again (as each DDP rank and the fill do): each file is named once
    warned = caplog.text
    for path in (flipped, truncated, emptied):
        assert warned.count(str(path)) == 1
    assert "checksum" in warned and "unreadable" in warned
    assert len(plan.missing_latents) == 2 and len(plan.missing_text) == 1

    loaders = Loaders(tiny_dev_dir)
    stats = fill_cache(plan, data, loaders.text, loaders.ae, progress=False)
    assert (stats.texts, stats.latents) == (1, 2)
    # the same image encoded again (in another batch, so equal up to float rounding)
    torch.testing.assert_close(store.read_latent(plan.variants[0][0].key), good_latent)
    _, data, plan = setup_run(data_dir, tiny_dev_dir, cache)
    assert plan.complete
    assert fill_cache(plan, data, forbidden, forbidden, progress=False).texts == 0
