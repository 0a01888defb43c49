"""Run by tests/test_ddp.py and tests/test_multinode.py as a script: a DDP fit on the CPU (gloo) that records,
per rank, which captions it trained on, a digest of its adapters after every optimizer step, which encoders it
loaded and what it encoded into the cache.

Lightning's DDP launcher re-runs this script for the other local ranks, so everything here runs in every process."""

import hashlib
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from flux_lora.config import load_config  # noqa: E402
from flux_lora.data import datamodule  # noqa: E402
from flux_lora.training.run import build, last_checkpoint  # noqa: E402

LOADS = {"text": 0, "ae": 0}
_text, _ae = datamodule._folder_text_encoders, datamodule._folder_autoencoder


def _count_text(*a, **k):
    LOADS["text"] += 1
    return _text(*a, **k)


def _count_ae(*a, **k):
    LOADS["ae"] += 1
    return _ae(*a, **k)


datamodule._folder_text_encoders, datamodule._folder_autoencoder = _count_text, _count_ae


class Record(L.Callback):
    def __init__(self, out: Path):
        self.out, self.captions, self.digests = out, [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.captions.append(list(batch["caption"]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        h = hashlib.sha256()
        for name, w in sorted(module.lora_weights().items()):
            h.update(name.encode() + w.down.numpy().tobytes() + w.up.numpy().tobytes())
        self.digests.append(h.hexdigest())

    def on_train_end(self, trainer, module):
        path = self.out / f"rank{trainer.global_rank}.json"
        stats = trainer.datamodule.fill_stats
        path.write_text(
            json.dumps(
                {
                    "captions": self.captions,
                    "digests": self.digests,
                    "loads": LOADS,
                    "fill": {"texts": stats.texts, "latents": stats.latents, "loaded": list(stats.loaded)},
                    "cache": str(trainer.datamodule.plan.root),
                    "world_size": trainer.world_size,
                    "pid": os.getpid(),
                }
            )
        )


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(Path(__file__).parents[1] / "configs/tiny.yaml", sys.argv[2:])
    torch.set_num_threads(1)
    trainer, module, dm = build(cfg)
    trainer.callbacks.append(Record(out))
    trainer.fit(module, datamodule=dm, ckpt_path=last_checkpoint(cfg))


if __name__ == "__main__":
    main()
