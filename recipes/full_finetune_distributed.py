"""The original's file name for ``recipes/full_finetune.py`` (one file serves one device and
FSDP2), kept so that scripts calling ``recipes/full_finetune_distributed.py`` by path keep working.
``medcap cp full_finetune_distributed`` copies the recipe itself, not this file."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("full_finetune.py")), run_name="__main__")
