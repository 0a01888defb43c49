"""Two "nodes" of two processes on this machine, through Lightning's own multi-node settings (num_nodes 2,
devices 2, ddp with gloo) and the environment variables a cluster sets, each node with its own cache folder:
the cache is filled in shards and the LoRA equals, bit for bit, one process's over the same global batches."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(tmp_path: Path, model_dir: Path, records: Path, cache: Path, *extra: str) -> list[str]:
    records.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        str(ROOT / "tests/ddp_worker.py"),
        str(records),
        f"--model.source={model_dir}",
        f"--data.cache_dir={cache}",
        f"--data.source={ROOT / 'examples/data'}",
        "--data.batch_size=1",
        "--train.accelerator=cpu",
        "--max_steps=3",  # 8 images, 4 per step: the third step is in the second epoch
        "--sample.prompts=[]",
        "--train.save_every_n_steps=0",
        "--train.checkpoint_every_n_steps=0",
        "--train.lr_scheduler=constant",
        "--lora.dropout=0",
        # a sign-based update: the ranks' gradients are summed by gloo in another order than one process
        # accumulates them (float addition is not associative); only their signs matter here
        "--train.optimizer=torch.optim.Rprop",
        "--train.learning_rate=0.001",
        "--train.optimizer_args={}",
        *extra,
    ]


def test_two_nodes_of_two_processes_equal_one_process(tmp_path, tiny_dev_dir):
    port = _free_port()
    nodes = []
    for node in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NODE_RANK": str(node),
            "WORLD_SIZE": "4",
        }
        cmd = _worker(
            tmp_path,
            tiny_dev_dir,
            tmp_path / "records",
            tmp_path / f"node{node}-cache",  # node-local cache folders
            f"--output_dir={tmp_path / 'run'}",
            "--train.num_nodes=2",
            "--train.devices=2",
            "--train.strategy=ddp",
        )
        nodes.append(
            subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=600) for p in nodes]
    for p, (_, err) in zip(nodes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / "records" / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(r["world_size"] == 4 for r in ranks) and len({r["pid"] for r in ranks}) == 4
    assert [Path(r["cache"]).name for r in ranks] == ["node0-cache"] * 2 + ["node1-cache"] * 2
    # each node's two ranks split its cache between them: together they encoded all of it, neither all of it
    for node in (ranks[:2], ranks[2:]):
        texts, latents = (sum(r["fill"][k] for r in node) for k in ("texts", "latents"))
        assert (texts, latents) == (9, 8)  # 8 captions and the empty one; 8 images
        assert all(0 < r["fill"]["texts"] + r["fill"]["latents"] < 17 for r in node)
    assert ranks[0]["fill"] == ranks[2]["fill"] and ranks[1]["fill"] == ranks[3]["fill"]  # shares by key
    assert len({d for r in ranks for d in [tuple(r["digests"])]}) == 1  # identical adapters on every rank

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = _worker(
        tmp_path,
        tiny_dev_dir,
        tmp_path / "records-single",
        tmp_path / "node0-cache",
        f"--output_dir={tmp_path / 'single'}",
        "--train.devices=1",
        "--train.accumulate_grad_batches=4",
    )
    proc = subprocess.run(single, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "records-single" / "rank0.json").read_text())
    assert one["loads"] == {"text": 0, "ae": 0}  # the cache is complete
    # the same global batches: step s of one process is micro-batches 4s..4s+3, rank r's batch s is 4s+r
    for step in range(3):
        assert one["captions"][4 * step : 4 * step + 4] == [r["captions"][step] for r in ranks]
    a, b = (load_file(tmp_path / run / "tiny.safetensors") for run in ("run", "single"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert any(bool(v.abs().sum() > 0) for k, v in a.items() if "lora_up" in k)  # it trained


LAUNCHERS = {
    "one process": ({}, (0, 0)),
    "lightning, the node 0 process": ({"NODE_RANK": "0", "MASTER_ADDR": "n0"}, (0, 0)),
    "lightning, a process it started": ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, (1, 1)),
    "lightning, the node 1 process": ({"NODE_RANK": "1"}, (1, 0)),
    "torchrun, node 1": ({"RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, (2, 0)),
    "srun, node 1": (
        {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NAME": "lora"},
        (3, 1),
    ),
    "salloc shell": ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "bash"}, (0, 0)),
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launch_ranks_from_the_launchers_environment(launcher, monkeypatch):
    """Only the global first process moves old outputs aside and holds the output lock, however it was started."""
    from flux_lora.training.run import launch_ranks

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_NAME", "lora")
    env, expected = LAUNCHERS[launcher]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if "SLURM_NTASKS" not in env:
        monkeypatch.delenv("SLURM_JOB_NAME")
    assert launch_ranks() == expected
