"""Pieces the training recipe (``recipes/full_finetune.py``) arranges: the dataset and optimizer
from the config, RNG and recipe state for exact resumes, step counting, and the loss curve.
Model assembly is in ``medcap.models.assembly``; devices and process groups in ``medcap.distributed``.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medcap.data.dataset import resolve_dataset_component
from medcap.models.checkpoints import safe_load
from medcap.models.fusion import MedcapModel

log = logging.getLogger("medcap")
RECIPE_STATE = "recipe_state.pt"
INITIAL_CHECKPOINT = "initial_vision.pt"  # save_initial_checkpoint=True: the vision side at step 0
BNB_PREFIX = "bitsandbytes."


def build_dataset(cfg_dataset: DictConfig, tokenizer: Any, model: MedcapModel, augment: Any = None, seed: int = 0):
    """Instantiate ``cfg.dataset``, mapping the original's torchtune ``chat_dataset`` to medcap's;
    ``augment`` (the config's ``image_augment``) turns on open_clip's training augmentation,
    drawn per sample from ``seed`` (see ``ImageChatDataset``)."""
    if augment is not None and not isinstance(augment, dict):
        augment = OmegaConf.to_container(augment, resolve=True)
    cfg_dataset = cfg_dataset.copy()
    cfg_dataset._component_ = resolve_dataset_component(cfg_dataset._component_)
    dataset = config.instantiate(
        cfg_dataset,
        tokenizer,
        num_image_tokens=model.num_image_tokens,
        image_transform=model.visual.preprocess.transform(augment),
    )
    if augment and hasattr(dataset, "augment_seed"):
        dataset.augment_seed = seed
    return dataset


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per trainable tensor, each stepped (and its gradient freed) by a hook as soon
    as backward has accumulated that tensor's gradient: all the gradients never exist at once
    (torchtune's ``optimizer_in_bwd``). To the recipe it is one optimizer: ``step`` and
    ``zero_grad`` have nothing left to do, its ``param_groups`` are the inner optimizers' own
    (so an LR schedule reaches them), its state dict holds theirs. Gradients must be final when
    backward produces them: the loss is normalised before backward, no clipping, no accumulation."""

    def __init__(self, params: list[torch.nn.Parameter], build: Any):
        super().__init__(params, {})
        self.inner = [build([p]) for p in params]
        self.param_groups = [g for opt in self.inner for g in opt.param_groups]
        for p, opt in zip(params, self.inner):
            p.register_post_accumulate_grad_hook(self._stepper(opt))

    @staticmethod
    def _stepper(opt: torch.optim.Optimizer):
        def hook(_: torch.Tensor) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)

        return hook

    def step(self, closure: Any = None) -> None:  # every step ran in backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"in_backward": [opt.state_dict() for opt in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("in_backward")
        if states is None or len(states) != len(self.inner):
            raise ValueError(
                "recipe_state.pt: the optimizer state was not saved with optimizer_in_bwd=True (or for another "
                "model); resume with the setting it was saved with"
            )
        for opt, state in zip(self.inner, states):
            opt.load_state_dict(state)


def build_optimizer(
    cfg_optimizer: DictConfig,
    params: list[torch.nn.Parameter],
    device: torch.device,
    distributed: bool,
    in_backward: bool = False,
):
    """The config's optimizer over ``params``; ``in_backward``: one per tensor, stepped in
    backward (``InBackwardOptimizer``)."""
    if in_backward:
        if distributed:
            raise ValueError("optimizer_in_bwd=True runs in one process; the distributed recipe steps after backward")
        return InBackwardOptimizer(params, lambda ps: build_optimizer(cfg_optimizer, ps, device, distributed))
    component = cfg_optimizer._component_
    if component.startswith(BNB_PREFIX) and distributed:
        raise ValueError(
            f"optimizer {component} cannot run under FSDP2 (bitsandbytes fails on sharded DTensor "
            "parameters); use torch.optim.AdamW in the distributed recipe"
        )
    kwargs = {}
    if component == "torch.optim.AdamW" and device.type == "cuda" and "fused" not in cfg_optimizer:
        kwargs["fused"] = True
    return config.instantiate(cfg_optimizer, params, **kwargs)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_state(states: dict[str, Any] | list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's generator state from a recipe state: one per rank since ranks draw apart
    (each is seeded seed + rank); a recipe state from before that holds one for all."""
    if isinstance(states, dict):
        return states
    if len(states) != world_size:
        log.warning(
            "resuming %d process(es) from a run of %d: rank %d takes rank %d's random state; random "
            "draws after the resume differ from an uninterrupted run", world_size, len(states), rank,
            rank % len(states),
        )  # fmt: skip
    return states[rank % len(states)]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(obj: Any) -> Any:
    """random.setstate wants tuples; a weights_only load returns lists."""
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def load_recipe_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {path} does not exist: nothing to resume "
            "(it is written beside meta_model_{epoch}.pt during training)"
        )
    return safe_load(path)


def config_as_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (loadable with weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)


def plot_loss_curve(steps: list[int], losses: list[float], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a nicety, never a reason to lose a finished run
        log.warning("matplotlib not installed: no loss curve written")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1, alpha=0.4, label="step")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def steps_per_epoch(num_batches: int, accumulation: int, max_steps: int | None) -> int:
    steps = math.ceil(num_batches / accumulation)
    return min(steps, max_steps) if max_steps else steps
