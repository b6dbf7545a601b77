"""The top-level config keys each recipe reads. An override no recipe reads (a typo such as
``vision_chekpoint=...``) is an error naming the key and the closest known one: torchtune's
``config.parse`` would add it to the config and every recipe would silently ignore it."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping

from medcap.errors import MedcapError

log = logging.getLogger("medcap")

MODEL = {
    "model", "tokenizer", "checkpointer", "device", "dtype", "seed", "output_dir",
    "vision", "vision_path", "vision_pretrained", "vision_checkpoint", "connector", "num_image_tokens",
    "freeze_vision_encoder",
}  # fmt: skip
TRAIN = MODEL | {
    "dataset", "batch_size", "epochs", "shuffle", "num_workers", "optimizer", "lr_scheduler", "clip_grad_norm",
    "gradient_accumulation_steps", "max_steps_per_epoch", "save_every_n_steps", "stop_after_steps",
    "resume_from_checkpoint", "compile", "enable_activation_checkpointing", "image_augment", "verify_frozen_llm",
    "metric_logger", "log_every_n_steps",
}  # fmt: skip
GENERATE = MODEL | {
    "batch_size", "max_new_tokens", "temperature", "top_k", "test_metrics", "test_slake", "test_vqarad",
    "dataset_source", "dataset_conversation_style", "dataset_chat_format", "dataset_max_seq_len", "vqa_mode",
    "answer_types", "eval_split", "eval_vqa", "limit", "image", "prompt", "compile", "two_turn_cache",
}  # fmt: skip
# Keys of torchtune's own recipe configs and of the original medcap's: accepted, not used.
ACCEPTED_UNUSED = {
    "loss", "optimizer_in_bwd", "log_peak_memory_stats", "profiler", "enable_activation_offloading",
    "memory_efficient_fsdp_wrap", "fsdp_cpu_offload", "custom_sharded_layers", "instruct_template", "chat_format",
    "enable_kv_cache", "quantizer", "trainonly",
}  # fmt: skip


class UnknownConfigKeyError(MedcapError, ValueError):
    """A top-level config key that the recipe does not read."""


def check_keys(cfg: Mapping, known: Iterable[str], recipe: str) -> None:
    known = set(known)
    unknown = [k for k in cfg if k not in known and k not in ACCEPTED_UNUSED]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            lines.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise UnknownConfigKeyError(
            f"the {recipe} recipe reads no config key named " + ", ".join(lines)
            + f"; its keys are: {', '.join(sorted(known))}"
        )
    ignored = sorted(k for k in cfg if k in ACCEPTED_UNUSED)
    if ignored:
        log.warning("%s: ignoring %s (torchtune / original medcap keys that medcap does not use)", recipe, ignored)
