"""Every rank fills its own share of the cache: by entry key, encoders loaded only by ranks that own a missing
entry of them, resumable, and verified whoever wrote an entry."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from flux_lora.data.cache import Share, fill_cache
from flux_lora.data.shards import _wait_for

from helpers.cache import Loaders, forbidden, setup_run

ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _many_images(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (6 * i, 255 - 6 * i, 100)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"picture number {i}")
    return root


def test_shares_split_entries_by_key_and_resume(tmp_path, tiny_dev_dir):
    """Two shares filled one after the other cover the plan; the second loads only what it owns; a third pass
    (any share) loads nothing."""
    data_dir = _many_images(tmp_path / "data", 8)
    _, data, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    owned = [
        (
            sum(Share(i, 2).owns(k) for k in plan.text_keys.values()),
            sum(Share(i, 2).owns(j.key) for j in plan.missing_latents),
        )
        for i in range(2)
    ]
    first = fill_cache(
        plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False, share=Share(0, 2)
    )
    assert (first.texts, first.latents) == owned[0]
    assert not plan.refresh().complete
    second = fill_cache(
        plan, data, Loaders(tiny_dev_dir).text, Loaders(tiny_dev_dir).ae, progress=False, share=Share(1, 2)
    )
    assert (second.texts, second.latents) == owned[1]
    assert plan.refresh().complete
    assert fill_cache(plan, data, forbidden, forbidden, progress=False, share=Share(1, 2)).loaded == ()


def test_four_ranks_each_encode_a_quarter(tmp_path, tiny_dev_dir):
    """torchrun starts 4 gloo ranks on one cache folder: each encodes about a quarter of the entries (exactly the
    ones its key share owns), loads an encoder only if it owns a missing entry of it, and all end complete."""
    data_dir = _many_images(tmp_path / "data", 40)
    out = tmp_path / "records"
    out.mkdir()
    markers = tmp_path / "cache" / ".fill"  # what interrupted fills left: another token, ignored; a week old, removed
    markers.mkdir(parents=True)
    (markers / "0ld.done0").touch()
    (markers / "0lder.rank1").touch()
    os.utime(markers / "0lder.rank1", (time.time() - 8 * 24 * 3600,) * 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=4",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        str(ROOT / "tests/shard_fill_worker.py"),
        str(data_dir),
        str(tiny_dev_dir),
        str(tmp_path / "cache"),
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    _, _, plan = setup_run(data_dir, tiny_dev_dir, tmp_path / "cache")
    assert plan.complete and all(r["complete"] for r in records)
    texts, latents = list(plan.text_keys.values()), list({j.key for v in plan.variants for j in v})
    total = len(texts) + len(latents)
    for rank, r in enumerate(records):
        own_texts = sum(Share(rank, 4).owns(k) for k in texts)
        own_latents = sum(Share(rank, 4).owns(k) for k in latents)
        assert (r["texts"], r["latents"]) == (own_texts, own_latents)
        assert r["encoded"] == {k: n for k, n in (("text", own_texts), ("ae", own_latents)) if n}
        assert r["loads"] == {k: 1 for k, n in (("text", own_texts), ("ae", own_latents)) if n}
        assert 0.15 < (own_texts + own_latents) / total < 0.35, (rank, own_texts, own_latents, total)
    assert sum(r["texts"] + r["latents"] for r in records) == total
    assert "4 ranks encoded" in proc.stderr and "rank 3 (share 4 of 4): encoded" in proc.stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    assert [p.name for p in markers.iterdir()] == ["0ld.done0"]  # each rank removed its own markers


def test_a_rank_that_fails_stops_the_others(tmp_path):
    (tmp_path / "t.done0").touch()
    (tmp_path / "t.failed1").touch()
    with pytest.raises(RuntimeError, match="rank 1 failed while filling the cache"):
        _wait_for(tmp_path, "t", [0, 1, 2], 0)
