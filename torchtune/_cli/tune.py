#!/usr/bin/env python
"""The original medcap's launcher path, kept so that its users' lines run unchanged:

    PYTHONPATH=./ CUDA_VISIBLE_DEVICES=0 python torchtune/_cli/tune.py run full_finetune_single_device ...

hands every argument to medcap's CLI (``medcap run|ls|cp|validate``, torchrun flags such as
``--master_port 29500 --nproc_per_node 8`` before the recipe name). This folder holds nothing
else and has no ``__init__.py``: with ``PYTHONPATH=./`` it is at most a namespace package, and
the installed torchtune, a regular package found later on the path, is what ``import torchtune``
gives.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # python puts this file's folder first on the path; the repository root is what medcap needs
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    from medcap.cli import main

    main()
