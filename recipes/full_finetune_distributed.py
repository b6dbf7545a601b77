"""Train the vision encoder + connector against a frozen LLM across GPUs (or CPU processes) with
FSDP2: the frozen decoder layers and the trainable parts are sharded.

    medcap run --nproc_per_node 8 full_finetune_distributed --config llama3/8B_full [key=value ...]

Multi-node: add torchrun's own flags (--nnodes, --node_rank, --rdzv_backend, --rdzv_endpoint).
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from medcap.finetune import run


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(cfg, distributed=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
