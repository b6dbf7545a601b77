"""Train the vision encoder + connector against a frozen LLM, on one device or under FSDP2.

    medcap run full_finetune_single_device --config llama3/8B_full_single_device [key=value ...]
    medcap run --nproc_per_node 8 full_finetune_distributed --config llama3/8B_full [key=value ...]

Both names run this file: under torchrun (``--nproc_per_node``, or torchrun's multi-node flags)
the frozen decoder layers and the trainable parts are sharded with FSDP2; otherwise it runs in
one process. It reads top to bottom: ``setup`` (tokenizer, LLM, vision side, data, optimizer,
schedule, resume), ``train`` (the loop), ``save``. Copy it to change the loop
(``medcap cp full_finetune_single_device my_recipe.py``, then ``medcap run my_recipe.py ...``);
the pieces it arranges live in ``medcap``.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchtune import config, modules, training
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.utils import get_device
from tqdm import tqdm

from medcap.data.collate import balance_weights, build_dataloader
from medcap.distributed import (
    end_distributed,
    fully_shard_model,
    launched_by_torchrun,
    launched_world_size,
    require_shared_folder,
    setup_device,
    world_size_and_rank,
)
from medcap.errors import ConfigError, run_main
from medcap.estimate.preflight import preflight
from medcap.io import atomic_write_json, ensure_writable
from medcap.models.assembly import autocast, build_model, resolve_precision
from medcap.models.checkpoints import atomic_save, load_checked, vision_checkpoint_payload
from medcap.models.fusion import count_parameters, frozen_fingerprint
from medcap.models.lora import LORA_KEY, load_lora_state, lora_state
from medcap.settings import TrainSettings
from medcap.training import (
    INITIAL_CHECKPOINT,
    RECIPE_STATE,
    build_dataset,
    build_optimizer,
    config_as_dict,
    load_recipe_state,
    plot_loss_curve,
    rank_rng_state,
    rng_state,
    set_rng_state,
    steps_per_epoch,
)


@dataclass
class _Window:
    """What one optimizer step has accumulated so far."""

    micro: int = 0
    loss_sum: float = 0.0
    label_tokens: int = 0
    input_tokens: int = 0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss_sum: float, label_tokens: int, batch: dict[str, Any], pad_id: int) -> None:
        self.loss_sum += loss_sum
        self.label_tokens += label_tokens
        self.input_tokens += int((batch["tokens"] != pad_id).sum())
        self.samples += batch["tokens"].shape[0]


class VisionFinetuneRecipe:
    def __init__(self, cfg: DictConfig, distributed: bool = False):
        self.cfg = cfg  # kept whole in every checkpoint and the metric log, for provenance
        self.settings = s = TrainSettings.from_config(cfg, "full_finetune")
        self.distributed = distributed
        if distributed:  # one rank's FSDP2 step, checked before the process group exists (the estimate's fake one needs the process)
            preflight(s, get_device(s.device), world_size=launched_world_size())
        self.device = setup_device(s.device, distributed)
        self.world_size, self.rank = world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.llm_dtype = resolve_precision(self.device, s.dtype)
        self.seed = training.set_seed(seed=s.seed)
        self.output_dir = Path(s.checkpointer.output_dir)
        self.epochs = s.epochs
        self.accumulation = s.gradient_accumulation_steps
        self.epoch = 0
        self.global_step = 0
        self.batches_done = 0  # in the current epoch, for mid-epoch resume
        self.history: list[tuple[int, float]] = []
        self.skipped = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        s = self.settings
        if not self.distributed:  # (the distributed recipe checked one rank's FSDP2 step in __init__)
            preflight(s, self.device)  # before any weight is read: refuses a run that cannot fit
        self.tokenizer = config.instantiate(s.tokenizer)
        # torchtune seeds each rank with seed + rank; the randomly initialised vision side must be
        # the same on every rank (and as in a one-process run), so it is built under the base seed
        torch.manual_seed(self.seed)
        if s.llm_lora is not None and self.distributed:
            raise ConfigError("llm_lora_rank: the LoRA comparison runs in one process (full_finetune_single_device)")
        model = build_model(s, self.tokenizer, self.llm_dtype, llm_lora=s.llm_lora)
        training.set_seed(seed=self.seed)
        trainable, frozen = count_parameters(model)
        lora = f" + LLM LoRA rank {s.llm_lora.rank} on {','.join(s.llm_lora.modules)}" if s.llm_lora else ""
        self._print(
            f"model: {trainable:,} trainable parameters (vision encoder {model.visual.name} + "
            f"{model.projector.kind} connector, {model.num_image_tokens} image tokens{lora}), {frozen:,} frozen (LLM)"
        )
        self._print(f"vision encoder weights: {model.visual.weights}")
        state = (
            load_recipe_state(self.output_dir / RECIPE_STATE) if s.resume_from_checkpoint else None
        )
        if state is not None:
            load_checked(model.visual.tower, state["model"]["visual"], "recipe_state ['visual']")
            load_checked(model.projector, state["model"]["projector"], "recipe_state ['projector']")
            if s.llm_lora is not None:
                load_lora_state(model.decoder, state["model"][LORA_KEY], f"recipe_state ['{LORA_KEY}']")
            self.epoch, self.global_step, self.batches_done = (
                state["epoch"],
                state["step"],
                state["batches_done"],
            )
            self.history = [tuple(x) for x in state.get("history", [])]
        if s.enable_activation_checkpointing:
            training.set_activation_checkpointing(
                model.decoder, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        if s.compile:
            for layer in model.decoder.layers:
                layer.compile()
        # FSDP2 and compiled layers are left to the plain pass (the shared one is untested there)
        model.share_prefix = s.share_prompt_prefix and not self.distributed and not s.compile
        self.model = self._place(model)
        # opt-in (hashing an 8B LLM takes a while): proves at the end that the frozen LLM is untouched
        self.frozen_before = frozen_fingerprint(self.model) if s.verify_frozen_llm else None

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(s.optimizer, params, self.device, self.distributed, s.optimizer_in_bwd)
        self.dataset = build_dataset(s.dataset, self.tokenizer, self.model, s.image_augment, self.seed)
        self.loader, self.sampler = build_dataloader(
            self.dataset,
            batch_size=s.batch_size,
            pad_id=self.tokenizer.pad_id,
            shuffle=s.shuffle,
            seed=self.seed,
            num_workers=s.num_workers,
            world_size=self.world_size,
            rank=self.rank,
            pin_memory=self.device.type == "cuda",
            weights=self._balance_weights(),
        )
        self.steps_per_epoch = steps_per_epoch(len(self.loader), self.accumulation, s.max_steps_per_epoch)
        total = self.steps_per_epoch * self.epochs
        self.scheduler = (
            config.instantiate(s.lr_scheduler, self.optimizer, num_training_steps=total)
            if s.lr_scheduler
            else None
        )
        if state is not None:
            self._load_optimizer(state)
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["lr_scheduler"])
            set_rng_state(rank_rng_state(state["rng"], self.rank, self.world_size))
            self._print(f"resumed at epoch {self.epoch}, step {self.global_step}")
        self.metric_logger = config.instantiate(s.metric_logger) if self.is_rank_zero else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(self.cfg)

    def _balance_weights(self) -> torch.Tensor | None:
        """Sampling weights that balance the records by ``balance_by`` (None: a permutation)."""
        name = self.settings.balance_by
        if not name:
            return None
        classes = self.dataset.field_values(name)
        if all(c is None for c in classes):
            raise ConfigError(f"balance_by={name}: no record of {self.settings.dataset.get('source')} has a field {name!r}")
        counts = Counter(classes)
        self._print(f"balanced by {name} (power {self.settings.balance_power}): " + ", ".join(
            f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])))  # fmt: skip
        return balance_weights(classes, self.settings.balance_power)

    def _place(self, model):
        if not self.distributed:
            return model.to(self.device)
        from torch.distributed.device_mesh import init_device_mesh

        return fully_shard_model(model, init_device_mesh(self.device.type, (self.world_size,)))

    def _print(self, msg: str) -> None:
        if self.is_rank_zero:
            tqdm.write(msg)

    # ------------------------------------------------------------------ train
    def _micro_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)], dim=1)
        images = batch["images"]
        if images is not None:
            images = images.to(self.device, non_blocking=True)
        with autocast(self.device, self.llm_dtype):  # trainable weights fp32, bf16 math under bf16
            logits, targets = self.model(tokens, images=images, labels=labels)
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        return loss_sum, int(targets.numel())

    def train(self) -> None:
        self.model.train()
        start_time = time.perf_counter()
        if self.settings.save_initial_checkpoint and self.global_step == 0 and self.batches_done == 0:
            self.save_initial()
        for epoch in range(self.epoch, self.epochs):
            self.epoch = epoch
            self.sampler.set_epoch(epoch)
            self.sampler.start_index = self.batches_done * self.settings.batch_size
            done_in_epoch = self.batches_done // self.accumulation
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=done_in_epoch,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                disable=not self.is_rank_zero,
                unit="step",
                dynamic_ncols=True,
            )
            window = _Window()
            for batch in self.loader:
                self.skipped += batch["num_skipped"]
                self.batches_done += 1
                window.micro += 1
                if batch["tokens"] is not None:
                    loss, n = self._micro_step(batch)
                    # in backward the optimizer steps on each gradient as it comes: normalise first
                    (loss / max(n, 1) if self.settings.optimizer_in_bwd else loss).backward()
                    window.add(loss.item(), n, batch, self.tokenizer.pad_id)
                if window.micro < self.accumulation:
                    continue
                self._complete_step(window, bar)
                window = _Window()
                done_in_epoch += 1
                every = self.settings.save_every_n_steps
                if every and self.global_step % every == 0:
                    self.save_recipe_state()
                if self.settings.stop_after_steps and self.global_step >= self.settings.stop_after_steps:
                    bar.close()
                    self.save_recipe_state()
                    self._print(
                        f"stopping after step {self.global_step} (stop_after_steps); resume_from_checkpoint=True continues"
                    )
                    return self._finish(start_time)
                if done_in_epoch >= self.steps_per_epoch:
                    break
            else:
                if window.micro:  # a last, shorter accumulation window: step on it too
                    self._complete_step(window, bar)
            bar.close()
            self.batches_done = 0
            self.save_epoch(epoch)
            if self.skipped:
                self._print(
                    f"epoch {epoch}: {self.skipped} records skipped (longer than max_seq_len without cutting "
                    "image tokens or the whole answer)"
                )
                self.skipped = 0
        self.epoch = self.epochs
        self._finish(start_time)

    def _complete_step(self, window: _Window, bar: tqdm) -> None:
        loss_sum, label_tokens = self._global_sums(window.loss_sum, window.label_tokens)
        grad_norm = self._optimizer_step(label_tokens)
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        step_loss = loss_sum / max(label_tokens, 1)
        self.history.append((self.global_step, step_loss))
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = {
            "loss": step_loss,
            "lr": lr,
            "tokens_per_second": window.input_tokens / elapsed,
            "samples_per_second": window.samples / elapsed,
        }
        if grad_norm is not None:  # before clipping: whether clip_grad_norm binds, and how hard
            metrics["grad_norm"] = grad_norm
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tokens_per_second']:.0f}",
                        smp_s=f"{metrics['samples_per_second']:.2f}")  # fmt: skip
        if self.metric_logger is not None and self.global_step % self.settings.log_every_n_steps == 0:
            if self.device.type == "cuda":
                metrics.update(training.get_memory_stats(self.device, reset_stats=False))
            self.metric_logger.log_dict(metrics, step=self.global_step)

    def _global_sums(self, loss_sum: float, label_tokens: int) -> tuple[float, int]:
        """Loss and label-token count over all ranks: every rank then normalises by the global
        count, so N processes take exactly the step one process would on the same batch."""
        if not self.distributed:
            return loss_sum, label_tokens
        sums = torch.tensor([loss_sum, float(label_tokens)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(sums)
        return float(sums[0]), int(sums[1])

    def _optimizer_step(self, label_tokens: int) -> float | None:
        """One optimizer step; the trainables' gradient norm before clipping when clipping is on."""
        # the loss is a sum over label tokens; FSDP2 averages gradients over ranks, hence world_size
        if label_tokens and not self.settings.optimizer_in_bwd:
            training.scale_grads(self.model, torch.tensor(self.world_size / label_tokens))
        if self.settings.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], max_norm=self.settings.clip_grad_norm
            )
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            grad_norm = float(norm)
        else:
            grad_norm = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        return grad_norm

    # ------------------------------------------------------------------ save
    def _trainable_states(self) -> tuple[dict, dict]:
        if not self.distributed:
            return self.model.visual.tower.state_dict(), self.model.projector.state_dict()
        return (
            training.gather_cpu_state_dict(self.model.visual.tower, self.is_rank_zero),
            training.gather_cpu_state_dict(self.model.projector, self.is_rank_zero),
        )

    def _lora_states(self) -> dict:
        """The LLM's LoRA weights for the recipe state (one process only), or nothing."""
        return {LORA_KEY: lora_state(self.model.decoder)} if self.settings.llm_lora is not None else {}

    def _optimizer_state(self) -> dict:
        if not self.distributed:
            return self.optimizer.state_dict()
        return training.get_full_optimizer_state_dict(self.model, self.optimizer, self.is_rank_zero)

    def _load_optimizer(self, state: dict) -> None:
        if not self.distributed:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            training.load_from_full_optimizer_state_dict(
                self.model, self.optimizer, state["optimizer"], self.device
            )

    def save_epoch(self, epoch: int) -> None:
        """``meta_model_{epoch}.pt`` (trainable weights only, original layout) and the recipe
        state to resume from; both written atomically."""
        states = self._trainable_states()
        if self.is_rank_zero:
            payload = vision_checkpoint_payload(
                self.model, epoch=epoch, step=self.global_step, config=config_as_dict(self.cfg), states=states
            )
            path = atomic_save(payload, self.output_dir / f"meta_model_{epoch}.pt")
            self._print(f"saved {path}")
        self.save_recipe_state(states, epoch=epoch + 1)

    def save_initial(self) -> None:
        """``initial_vision.pt``: the vision side as training starts (its seeded initialisation,
        or the pretrained weights), so "trained vs untrained" compares like with like. Not a
        ``meta_model_*.pt``: evaluating ``meta_model_*.pt`` never picks it up."""
        states = self._trainable_states()
        if self.is_rank_zero:
            payload = vision_checkpoint_payload(
                self.model, epoch=-1, step=0, config=config_as_dict(self.cfg), states=states
            )
            self._print(f"saved {atomic_save(payload, self.output_dir / INITIAL_CHECKPOINT)}")

    def save_recipe_state(self, states: tuple[dict, dict] | None = None, epoch: int | None = None) -> None:
        states = states or self._trainable_states()
        optimizer = self._optimizer_state()
        rngs = [rng_state()]
        if self.distributed:  # each rank draws from its own generator (seeded seed + rank)
            rngs = [None] * self.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if not self.is_rank_zero:
            return
        state = {
            "model": {"visual": states[0], "projector": states[1], **self._lora_states()},
            "optimizer": optimizer,
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch if epoch is None else epoch,
            "step": self.global_step,
            "batches_done": 0 if epoch is not None else self.batches_done,
            "seed": self.seed,
            "rng": rngs,
            "history": [list(x) for x in self.history],
        }
        atomic_save(state, self.output_dir / RECIPE_STATE)

    def _finish(self, start_time: float) -> None:
        if not self.is_rank_zero:
            return
        elapsed = time.perf_counter() - start_time
        curve = None
        if self.history:
            steps, losses = zip(*self.history)
            curve = plot_loss_curve(list(steps), list(losses), Path(self.settings.output_dir) / "loss_curve.png")
        if self.device.type == "cuda":
            peak = f"{training.get_memory_stats(self.device)['peak_memory_alloc']:.2f} GiB GPU"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
        final = f"{self.history[-1][1]:.4f}" if self.history else "n/a"
        if self.frozen_before is not None:
            self._check_frozen()
        self._print(
            f"done: {self.global_step} steps in {elapsed:.1f} s, final loss {final}, peak memory {peak}"
            + (f", loss curve {curve}" if curve else "")
        )

    def _check_frozen(self) -> None:
        after = frozen_fingerprint(self.model)
        unchanged = after == self.frozen_before
        atomic_write_json(Path(self.settings.output_dir) / "frozen_llm.json",
                          {"before": self.frozen_before, "after": after, "unchanged": unchanged}, indent=2)  # fmt: skip
        if not unchanged:
            raise RuntimeError("the frozen LLM's weights changed during training (verify_frozen_llm): a bug")
        self._print(f"frozen LLM bitwise unchanged (sha256 {after[:16]}...)")

    def cleanup(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()
        if self.distributed:
            end_distributed()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = VisionFinetuneRecipe(cfg, distributed=launched_by_torchrun())  # settings checked here
    s = recipe.settings
    # every folder the run writes, made and proven writable before any model is loaded
    ensure_writable([("output_dir", s.output_dir), ("checkpointer.output_dir", s.checkpointer.output_dir),
                     ("metric_logger.log_dir", (s.metric_logger or {}).get("log_dir"))])  # fmt: skip
    # on several machines rank 0 writes the checkpoints and every rank reads them on resume
    require_shared_folder(s.checkpointer.output_dir, "checkpointer.output_dir")
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
