"""Run by tests/test_streaming.py under torchrun: one of the processes that split a streaming source (data.streaming)
between them, then train on it with Lightning's DDP (gloo, CPU). Records per rank what it read from the stream, what
it encoded (captions and images), and the LoRA file rank 0 wrote.

Arguments: output folder for rank<r>.json, then train.py's overrides of configs/tiny.yaml."""

import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from flux_lora.config import load_config  # noqa: E402
from flux_lora.data import stream  # noqa: E402
from flux_lora.model.autoencoder import AutoEncoder  # noqa: E402
from flux_lora.model.text_encoders import TextEncoders  # noqa: E402
from flux_lora.training.run import run  # noqa: E402

READ: list[tuple[int, int]] = []
ENCODED = {"images": 0, "captions": 0}
_stream, _ae, _text = stream.stream_into_cache, AutoEncoder.encode, TextEncoders.encode


def _count_stream(*a, **k):
    READ.append(_stream(*a, **k))
    return READ[-1]


def _count_ae(self, x):
    ENCODED["images"] += x.shape[0]
    return _ae(self, x)


def _count_text(self, captions, *a, **k):
    ENCODED["captions"] += len(captions)
    return _text(self, captions, *a, **k)


stream.stream_into_cache, AutoEncoder.encode, TextEncoders.encode = _count_stream, _count_ae, _count_text


def main() -> None:
    out = Path(sys.argv[1])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    cfg = load_config(Path(__file__).parents[1] / "configs/tiny.yaml", sys.argv[2:])
    lora = run(cfg)
    record = {"read": READ, "encoded": ENCODED, "lora": str(lora) if lora else None}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
