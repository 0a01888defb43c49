"""Train a FLUX.1 LoRA on a frozen FLUX.1 DiT (fp8 or float) from a YAML experiment and command-line overrides.

``flux-lora-train --config configs/<experiment>.yaml [--section.field value ...]`` (also ``python train.py ...``
from a checkout, or ``python -m flux_lora.cli.train``).

Any config field can be overridden, by dotted path (``--train.learning_rate 5e-5``) or, where unambiguous, by its
name (``--quantize float8_e4m3fn``, ``--max_steps 200``). List fields take JSON/YAML list syntax or repeated flags
(``--sample.prompts "a cat, sitting" --sample.prompts "a dog"``); text is never split on commas. ``--help`` lists
every field; ``--print-config`` prints the resolved configuration and exits. See README.md and configs/.
"""

import argparse
import logging
import sys

import yaml

from flux_lora import config_io
from flux_lora.config import DataError, ExperimentConfig, load_config
from flux_lora.config_io import ConfigError
from flux_lora.weights.hub import ModelNotFoundError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        usage="%(prog)s [-h] [--config CONFIG] [--print-config] [--section.field VALUE ...]",
        description=__doc__.splitlines()[0],
        epilog="config fields (each also --field when the name is unique):\n" + config_io.help_text(ExperimentConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="experiment YAML (configs/*.yaml); a run's own config.yaml reproduces it")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved YAML and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Help, usage errors and config errors answer before torch is imported (the first seconds of a run)."""
    args, overrides = parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("flux_lora.train")
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, DataError) as e:
        log.error("%s", e)
        return 2
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(config_io.to_dict(cfg), sort_keys=False))
        return 0
    return _train(cfg, log)


def _train(cfg: ExperimentConfig, log: logging.Logger) -> int:
    # Imported here, not at the top: torch and Lightning take seconds to import, which --help does not need.
    from flux_lora.data.cache import CacheEntryError
    from flux_lora.training.console import quiet_third_party
    from flux_lora.training.guards import NonFiniteLossError, StoppedBySignal, stop_outside_steps
    from flux_lora.training.run import run

    # Lightning adds its own console handlers on import: with ours, every Lightning line printed twice
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    quiet_third_party()
    try:
        with stop_outside_steps():
            lora = run(cfg)
    except StoppedBySignal as e:
        log.warning("%s", e)
        return e.exit_code
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    except (ConfigError, DataError, ModelNotFoundError) as e:
        log.error("%s", e)
        return 2
    except CacheEntryError as e:
        log.error("%s; rerun the same command: it resumes and encodes the entry again", _last_line(e))
        return 2
    except OSError as e:  # disk full, or a folder that cannot be written: the message names the file
        log.error("%s", _last_line(e))
        return 3
    if lora is not None:
        log.info("LoRA written to %s", lora)
    return 0


def _last_line(e: BaseException) -> str:
    """The error's own line (a DataLoader worker's error carries its traceback in the message)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())
