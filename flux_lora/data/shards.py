"""Filling the cache from every rank of a distributed run: each encodes its own share of the missing entries.

Called on every rank once the process group exists (Lightning creates it before ``prepare_data``; the data
module calls :func:`fill_distributed` from ``setup``):

1. **Who shares a folder.** Every rank writes a probe file ``.fill/<token>.rank<r>`` into its cache folder
   (``token``: new for this fill, sent by rank 0), a barrier, then every rank looks for the others' probes. The
   ranks that find each other's probes fill one folder together: every rank of every node on shared storage,
   the ranks of one node with node-local folders (a folder another node cannot see is never taken for shared;
   a shared one whose files another node does not see yet is filled by each node on its own, only slower).
2. **Own share.** Rank ``r``, the ``i``-th of the ``n`` ranks of its folder, encodes the missing entries whose
   key (a sha256) is ``i`` mod ``n`` (:class:`~flux_lora.data.cache.Share`), text and latents, loading an encoder
   only if it owns a missing entry of it; the same shares on a rerun, so an interrupted fill resumes where each
   rank stopped (entries are written atomically as they are encoded and verified when read, whoever wrote them).
3. **Done markers, no collective.** Each rank then writes ``.fill/<token>.done<r>`` and polls the folder until
   every rank of its folder has one (a rank that fails writes ``.fill/<token>.failed<r>`` and the others stop
   with an error). Markers of an interrupted fill carry another token and are ignored (and removed once a
   week old). Whatever is still missing then (an entry of another rank that fails its checksum) is encoded by
   the rank that finds it.
4. **One barrier with a long timeout** (:data:`FILL_TIMEOUT`, a gloo group of its own, made before anything is
   encoded) joins the folders' groups, whose shares may end at different times; then the counts are gathered
   and rank 0 logs the total.

No collective of the training's process group runs while a rank encodes, so its timeout (30 min by default)
does not bound the fill.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from flux_lora.data.cache import CachePlan, FillStats, Share, fill_cache
from flux_lora.data.scan import ScannedData
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.text_encoders import TextEncoders

log = logging.getLogger(__name__)

FILL_TIMEOUT = timedelta(hours=48)  # the longest a rank waits for the others' shares
POLL_S = 0.2  # how often a waiting rank looks for the others' done markers (per 8 ranks, at most 5 s)
WAIT_LOG_S = 30.0  # how often a waiting rank says whom it waits for
STALE_S = 7 * 24 * 3600.0  # markers of interrupted fills older than this are removed


def distributed() -> bool:
    """Whether this process is one rank of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def fill_distributed(
    plan: CachePlan,
    data: ScannedData,
    load_text_encoders: Callable[[], TextEncoders],
    load_autoencoder: Callable[[], AutoEncoder],
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    progress: bool = True,
) -> FillStats:
    """This rank's share of ``plan``'s missing entries, then wait for the other ranks (see the module's text).
    Every rank must call it, with or without missing entries (it makes a process group and barriers)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo", timeout=FILL_TIMEOUT)  # collective: every rank, before any encoding
    token = [uuid.uuid4().hex if rank == 0 else ""]
    dist.broadcast_object_list(token, src=0, group=group)
    markers = plan.root / ".fill"
    markers.mkdir(parents=True, exist_ok=True)
    _remove_stale(markers)
    probe = markers / f"{token[0]}.rank{rank}"
    probe.touch()
    dist.barrier(group=group)
    peers = [r for r in range(world) if (markers / f"{token[0]}.rank{r}").exists()]
    share = Share(peers.index(rank), len(peers), f"rank {rank} (share {peers.index(rank) + 1} of {len(peers)})")
    if share.index == 0:
        log.info("cache %s: filled by ranks %s, each encoding its share", plan.root, peers)
    done = markers / f"{token[0]}.done{rank}"
    try:
        stats = fill_cache(
            plan, data, load_text_encoders, load_autoencoder, device, batch_size, progress and rank == 0, share
        )
        done.touch()
        _wait_for(markers, token[0], peers, rank)
        rest = FillStats()
        if not plan.refresh().complete:  # an entry of another rank that fails its checksum here
            rest = fill_cache(
                plan, data, load_text_encoders, load_autoencoder, device, batch_size, False, Share(0, 1, f"rank {rank}")
            )
    except BaseException:
        (markers / f"{token[0]}.failed{rank}").touch()
        raise
    stats = FillStats(
        stats.texts + rest.texts, stats.latents + rest.latents, tuple(dict.fromkeys(stats.loaded + rest.loaded))
    )
    dist.barrier(group=group)  # the folders' groups end their fills at different times: the long timeout
    gathered: list[FillStats | None] = [None] * world
    dist.all_gather_object(gathered, stats, group=group)
    for path in (probe, done):
        path.unlink(missing_ok=True)
    if rank == 0:
        per_rank = ", ".join(f"rank {r}: {s.texts}+{s.latents}" for r, s in enumerate(gathered) if s is not None)
        log.info(
            "cache %s: %d ranks encoded %d captions and %d latents in all (captions+latents per rank: %s)",
            plan.root,
            world,
            sum(s.texts for s in gathered if s is not None),
            sum(s.latents for s in gathered if s is not None),
            per_rank,
        )
    dist.destroy_process_group(group)
    return stats


def _wait_for(markers: Path, token: str, peers: list[int], rank: int) -> None:
    """Poll until every rank of ``peers`` has written its done marker; raise if one failed or after
    :data:`FILL_TIMEOUT`."""
    started = last_log = time.monotonic()
    poll = min(POLL_S * -(-len(peers) // 8), 5.0)  # one directory listing per poll: fewer with many ranks
    while True:
        names = set(os.listdir(markers))
        failed = [r for r in peers if f"{token}.failed{r}" in names]
        if failed:
            raise RuntimeError(f"rank {failed[0]} failed while filling the cache {markers.parent}")
        waiting = [r for r in peers if f"{token}.done{r}" not in names]
        if not waiting:
            return
        now = time.monotonic()
        if now - started > FILL_TIMEOUT.total_seconds():
            raise RuntimeError(f"ranks {waiting} did not finish their share of the cache {markers.parent} in time")
        if now - last_log >= WAIT_LOG_S:
            log.info("rank %d: share written, waiting for ranks %s", rank, waiting)
            last_log = now
        time.sleep(poll)


def _remove_stale(markers: Path) -> None:
    """Remove the markers an interrupted fill left, once they are :data:`STALE_S` old (a fill of another run on
    the same folder may be under way: its markers are new)."""
    now = time.time()
    for path in markers.iterdir():
        try:
            if now - path.stat().st_mtime > STALE_S:
                path.unlink()
        except FileNotFoundError:  # another rank removed it first
            pass
