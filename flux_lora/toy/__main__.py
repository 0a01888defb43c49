import sys

from flux_lora.toy.cli import main

sys.exit(main())
