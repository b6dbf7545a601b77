"""Evaluate vision checkpoints with a frozen LLM: captions (test_metrics), SLAKE or VQA-RAD
(test_slake / test_vqarad), the original CSVs plus JSON summaries.

    medcap run generate --config custom_generation_config test_slake=True \
        dataset_source=./datasets/SLAKE vision_checkpoint='RUN/checkpoint/meta_model_*.pt' ...

The work is in ``medcap.evaluation.runner.Evaluator``.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from medcap.errors import run_main
from medcap.evaluation.runner import Evaluator
from medcap.io import ensure_writable
from medcap.recipe_keys import GENERATE, check_keys


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    check_keys(cfg, GENERATE, "generate")
    ensure_writable([("output_dir", cfg.output_dir)])  # before the LLM is loaded
    Evaluator(cfg).run()


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
