"""Run by tests/test_sharded_fill.py under torchrun: one rank of a distributed cache fill on the CPU (gloo) that
records what it encoded and which encoders it loaded.

Arguments: data folder, tiny model folder, cache folder, output folder for rank<r>.json."""

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from flux_lora.data.shards import fill_distributed  # noqa: E402

from helpers.cache import Loaders, setup_run  # noqa: E402


def main() -> None:
    data_dir, model, cache, out = (Path(a) for a in sys.argv[1:5])
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loaders = Loaders(model)
    _, data, plan = setup_run(data_dir, model, cache)
    stats = fill_distributed(plan, data, loaders.text, loaders.ae, batch_size=4, progress=False)
    record = {
        "texts": stats.texts,
        "latents": stats.latents,
        "loaded": list(stats.loaded),
        "loads": dict(loaders.loads),
        "encoded": dict(loaders.encoded),
        "complete": plan.refresh().complete,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
