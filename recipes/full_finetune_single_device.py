"""Train the vision encoder + connector against a frozen LLM on one device.

    medcap run full_finetune_single_device --config llama3/8B_full_single_device [key=value ...]

The recipe is ``medcap.finetune.VisionFinetuneRecipe``: setup, train loop, save.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from medcap.finetune import run


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(cfg, distributed=False)


if __name__ == "__main__":
    sys.exit(recipe_main())
